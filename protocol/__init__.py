"""The Flower wire protocol shared by the ClientApp and the strategy."""
