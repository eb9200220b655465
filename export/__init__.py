"""torch -> ONNX export with preprocessing, logits and OOD score in one graph; parity checks; bring-your-own-model wrapping."""
