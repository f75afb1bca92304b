"""graph_moe: rewrite the expert loops of Mixture-of-Experts models into grouped GEMMs under torch.compile."""
