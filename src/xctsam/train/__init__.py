"""Training: losses shared by every model, and the one loop that trains them."""
