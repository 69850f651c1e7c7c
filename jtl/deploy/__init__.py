"""Shipping a trained run: SavedModel, TFLite and ONNX exports (`jtl export`) and their runtimes
(`jtl predict --exported`).

  layout.py        the formats, their files and the export.json manifest
  graph_decode.py  the Pillow scan's decisions in TF ops, so a SavedModel decodes JPEG/PNG itself
  saved_model.py   jax2tf forward pass behind the evaluation transform, three signatures
  tflite.py        TFLite float32 / float16 / dynamic-range int8 from the SavedModel
  onnx_model.py    ONNX from the float32 TFLite file (tf2onnx), run with onnxruntime
  build.py         writes and checks an export directory, all or nothing
  runtime.py       runs an exported format on image files
"""
