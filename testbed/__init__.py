"""SALAD testbed: a small Wan 2.1 text-to-video model trained on procedural clips (issue 7).

data.py (procedural clips + captions), codec.py (linear PCA video codec <-> Wan 2.1 latents),
text.py (fixed caption -> Wan context encoder), detect.py (caption adherence of decoded clips).
"""
