"""Inference, above data, models and metrics: from a trained network to masks.

    predict.py        load checkpoints (.pt) or exported models (.onnx) and predict one case
    sliding_window.py Gaussian-weighted sliding window with batched windows and TTA flips
    postprocess.py    post-processing rules (component sizes, enhancing-label volume, largest component)
    tuning.py         choosing those rules on validation predictions
    render.py         the labelled pictures (infer.py --png and the TensorBoard panel)
    onnx_model.py     ONNX Runtime as the network of the sliding window, and the metadata contract
    onnx_export.py    a PyTorch network -> an ONNX graph with that contract
"""
