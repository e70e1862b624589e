"""cnncore: CNN layers, models and training written from first principles in NumPy."""
