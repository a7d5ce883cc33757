"""One module per op: argument checks, the torch.library custom op, autograd and backend dispatch."""
