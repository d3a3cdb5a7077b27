"""PyTorch training of the unCLIP stages (needs the ``train`` extra). See ``stages`` for the API."""
