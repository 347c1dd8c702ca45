"""How bits run: packing layouts, the reference kernel, Triton kernels and the quantized Linear."""
