"""How a weight becomes bits: quantization schemes and the methods that produce them."""
