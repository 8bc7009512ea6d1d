"""The device in a browser tab: the head and the tail exported to ONNX, for ONNX Runtime Web to run in the page
(docs/browser.md). `export` writes the parts; `steps` is what is exported; `check` compares them with PyTorch."""
