"""Convert a UI-format ComfyUI workflow (what the browser saves and loads) to an API-format prompt.

ComfyUI's backend has no such converter (the browser does it), so tests and the demo use this one.
Widget values are matched to inputs in the order ``/object_info`` gives (``input_order``); an INT
input with ``control_after_generate`` carries one extra UI-only value (fixed/randomize/...).
Bypassed nodes (mode 4) pass their matching input through; muted nodes (mode 2) and frontend-only
nodes (Note, MarkdownNote) are dropped.
"""
from __future__ import annotations

FRONTEND_ONLY = {"Note", "MarkdownNote", "PrimitiveNode", "Reroute"}
# widgets the frontend adds to some core nodes beyond /object_info: not saved in widgets_values, sent with Run
# as an empty string
FRONTEND_WIDGETS = {"PreviewAny": ("preview",)}
# combo options that make the frontend add its upload button widget after the file combo
UPLOAD_OPTIONS = ("image_upload", "animated_image_upload", "video_upload")
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
_MISSING = object()


def _is_widget(spec) -> bool:
    typ = spec[0]
    return isinstance(typ, list) or typ in WIDGET_TYPES


def _has_control(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    v = opts.get("control_after_generate")
    return bool(v) if v is not None else name in ("seed", "noise_seed")


def _extra_widgets(name: str, spec) -> int:
    """Frontend-only widget values saved after this input's value: the control-after-generate mode of seeds,
    the 'upload' button value of image and video file inputs (LoadImage, LoadVideo)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    upload = any(opts.get(k) for k in UPLOAD_OPTIONS)
    return int(_has_control(name, spec) and spec[0] == "INT") + int(upload)


def _input_specs(info: dict) -> list[tuple[str, list]]:
    out = []
    order = info.get("input_order") or {k: list(v) for k, v in info["input"].items()}
    for section in ("required", "optional"):
        for name in order.get(section, []):
            out.append((name, info["input"][section][name]))
    return out


def ui_to_api(ui: dict, object_info: dict) -> dict:
    nodes = {n["id"]: n for n in ui["nodes"]}
    links = {l[0]: l for l in ui.get("links", [])}

    def source(link_id, seen=()):
        link = links.get(link_id)
        if link is None:
            return None
        _, src, src_slot, _dst, _dst_slot, typ = link[:6]
        node = nodes[src]
        mode = node.get("mode", 0)
        if mode == 2:
            return None
        if mode == 4:  # bypass: the first input of the same type passes through
            if src in seen:
                raise ValueError(f"bypass loop at node {src}")
            for inp in node.get("inputs", []):
                if inp.get("type") == typ and inp.get("link") is not None:
                    return source(inp["link"], seen + (src,))
            return None
        return [str(src), src_slot]

    api = {}
    for nid, node in nodes.items():
        typ = node["type"]
        if typ in FRONTEND_ONLY or node.get("mode", 0) in (2, 4):
            continue
        if typ not in object_info:
            raise KeyError(f"node {nid}: type '{typ}' is not known to this ComfyUI (missing custom node?)")
        widgets = list(node.get("widgets_values") or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"node {nid} ({typ}): dict widgets_values are not supported")
        linked = {i["name"]: i["link"] for i in node.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        w = 0
        for name, spec in _input_specs(object_info[typ]):
            value = _MISSING
            if _is_widget(spec):
                if w < len(widgets):
                    value = widgets[w]
                w += 1 + _extra_widgets(name, spec)
            if name in linked:
                src = source(linked[name])
                if src is not None:
                    inputs[name] = src
            elif value is not _MISSING:
                inputs[name] = value
        for name in FRONTEND_WIDGETS.get(typ, ()):
            inputs[name] = ""
        api[str(nid)] = {"class_type": typ, "inputs": inputs}
    return api
