"""Data: schema, loaders, bundled datasets, partitioners, preprocessing."""
