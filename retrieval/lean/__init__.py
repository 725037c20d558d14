"""The query path without torch: what `famsearch search` runs on the default settings, in ONNX Runtime and numpy.

Importing torch is most of a cold `famsearch search` (~1.5 s of ~2 s). For the settings most searches use — the
bundled backbone through its cached ONNX export, no head, focus or gap pooling, the default map (fam-fine) and
re-ranking by matched parts — nothing in a query needs it:

    encode.py   a photo -> the ONNX session's maps -> focus cells, z and what the maps read  (retrieval.encoder)
    fine.py     the default map, fam-fine                                                     (retrieval.fam)
    parts.py    re-ranking by matched parts and the correspondences                            (retrieval.rerank)
    engine.py   `LeanEngine`: `retrieval.flow.SearchFlow` over those                           (retrieval.engine)

Each module is the numpy twin of the torch module named beside it, which stays the reference (training, evaluation,
every other explainer, heads, boxes, the GPU); tests compare the twins on real photos, function by function and
query by query. Nothing here imports torch (tests/test_lean_*.py check it in a fresh process).
"""
