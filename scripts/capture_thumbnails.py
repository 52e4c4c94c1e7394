#!/usr/bin/env python
"""Regenerate the template thumbnails ``workflows/<name>.jpg`` from ComfyUI's real frontend.

ComfyUI's template browser shows ``<workflow name>.jpg`` beside each ``<workflow name>.json`` of a
pack's ``workflows/`` folder.  This script starts a headless ComfyUI (0.3.75 from the dev venv, or
``COMFYUI_DIR``) with this pack and the installed ``comfyui-frontend-package``, opens it in headless
Chromium over the DevTools protocol (tests/frontend_driver.py), loads each template, and takes a
screenshot of the canvas only:

- no page chrome (menus, tabs, side bar, Run button, banners, toasts): hidden by CSS, only the graph
  canvas and the nodes' DOM widgets (prompt text boxes) stay visible;
- no minimap, no canvas info overlay (fps / node counts), no selection toolbox;
- the view fitted to every node *including its title bar* (and groups), with a margin, so no title
  is clipped; the test checks each node's rectangle lies inside the picture.

Usage (from the repository root, after scripts/setup_env.sh; needs Debian's ``chromium``, and a
CJK font such as ``fonts-wqy-zenhei`` for the Chinese negative prompts)::

    .venv/bin/python scripts/capture_thumbnails.py            # writes workflows/*.jpg
    .venv/bin/python scripts/capture_thumbnails.py --out /tmp/thumbs --only "Wan 2.1 T2V 1.3B with SALAD"
"""
from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import frontend_driver as fd  # noqa: E402

VIEW_W, VIEW_H = 1600, 1000     # browser viewport the graph is fitted into
THUMB_W, THUMB_H = 1024, 640    # written size (the template browser shows it in a square card, object-contain)
MARGIN = 28                     # screen pixels kept free around the fitted graph

HIDE_CHROME_CSS = """
body * { visibility: hidden !important; transition: none !important; animation: none !important; }
#graph-canvas, .dom-widget, .dom-widget * { visibility: visible !important; }
"""

# Fit every node (title bar included) and group into the viewport; return what was drawn where.
FIT_JS = r"""
(async ({W, H, margin, css}) => {
  const app = window.app, LG = window.LiteGraph, c = app.canvas;
  let style = document.getElementById('salad-thumb-css');
  if (!style) {
    style = document.createElement('style');
    style.id = 'salad-thumb-css';
    document.head.appendChild(style);
  }
  style.textContent = css;
  c.show_info = false; c.render_info = false;
  c.deselectAll && c.deselectAll();
  const TH = LG.NODE_TITLE_HEIGHT;
  const rects = [];
  for (const n of app.graph._nodes) {
    const w = n.flags && n.flags.collapsed ? (n._collapsed_width || LG.NODE_COLLAPSED_WIDTH || 80) : n.size[0];
    const h = n.flags && n.flags.collapsed ? 0 : n.size[1];
    rects.push({id: n.id, title: n.title, x: n.pos[0], y: n.pos[1] - TH, w: w, h: h + TH});
  }
  for (const g of (app.graph._groups || app.graph.groups || [])) {
    rects.push({id: 'group', title: g.title, x: g.pos[0], y: g.pos[1], w: g.size[0], h: g.size[1]});
  }
  const x0 = Math.min(...rects.map(r => r.x)), y0 = Math.min(...rects.map(r => r.y));
  const x1 = Math.max(...rects.map(r => r.x + r.w)), y1 = Math.max(...rects.map(r => r.y + r.h));
  const scale = Math.min((W - 2 * margin) / (x1 - x0), (H - 2 * margin) / (y1 - y0));
  const ds = c.ds;
  ds.scale = scale;
  ds.offset[0] = W / 2 / scale - (x0 + x1) / 2;
  ds.offset[1] = H / 2 / scale - (y0 + y1) / 2;
  c.setDirty(true, true);
  c.draw(true, true);
  for (let i = 0; i < 4; i++) await new Promise(r => requestAnimationFrame(r));
  c.draw(true, true);
  await new Promise(r => setTimeout(r, 150));
  const screen = rects.map(r => ({id: r.id, title: r.title,
      x: (r.x + ds.offset[0]) * scale, y: (r.y + ds.offset[1]) * scale, w: r.w * scale, h: r.h * scale}));
  const visible = el => { if (!el) return false; const s = getComputedStyle(el), b = el.getBoundingClientRect();
                          return s.display !== 'none' && s.visibility !== 'hidden' && b.width > 0 && b.height > 0; };
  // anything besides the graph canvas and DOM widgets that is still painted on top
  const painted = [...document.body.querySelectorAll('*')].filter(el =>
      el.id !== 'graph-canvas' && !el.closest('.dom-widget') && visible(el) &&
      getComputedStyle(el).visibility === 'visible' && el.tagName !== 'STYLE');
  return {scale, rects: screen, W, H,
          canvas: [c.canvas.width, c.canvas.height],
          show_info: !!c.show_info, render_info: !!c.render_info,
          minimap_setting: app.ui.settings.getSettingValue('Comfy.Minimap.Visible'),
          canvas_info_setting: app.ui.settings.getSettingValue('Comfy.Graph.CanvasInfo'),
          other_painted: painted.slice(0, 10).map(el => el.tagName + '.' + String(el.className).slice(0, 60))};
})
"""


def capture(browser: fd.Browser, workflow: dict, width: int = THUMB_W, height: int = THUMB_H) -> tuple[bytes, dict]:
    """Load ``workflow`` in the open frontend, fit it, and return (JPEG bytes, layout info)."""
    from PIL import Image
    fd.load_workflow(browser, workflow)
    args = {'W': browser.width, 'H': browser.height, 'margin': MARGIN, 'css': HIDE_CHROME_CSS}
    info = browser.eval(f"{FIT_JS}({json.dumps(args)})")
    png = browser.screenshot("png")
    img = Image.open(io.BytesIO(png)).convert("RGB")
    info["screenshot"] = list(img.size)
    img = img.resize((width, height), Image.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=88, optimize=True, progressive=True)
    return buf.getvalue(), info


def template_workflows() -> list[Path]:
    """The user templates: workflows/*.json (not workflows/dev/)."""
    return sorted((ROOT / "workflows").glob("*.json"))


def open_session(stack, frontend_root: Path | None = None):
    """Start ComfyUI with the real frontend and a browser on it (both closed by ``stack``)."""
    from comfy_harness import ComfyServer
    static = Path(frontend_root) if frontend_root else fd.frontend_static_dir()
    if static is None:
        raise SystemExit("comfyui-frontend-package is not installed (scripts/setup_env.sh installs it)")
    server = stack.enter_context(ComfyServer(extra_args=["--front-end-root", str(static)], with_fixture_nodes=False))
    fd.store_settings(server)
    browser = stack.enter_context(fd.Browser(width=VIEW_W, height=VIEW_H))
    fd.open_frontend(browser, server, ["SALADApplyAttention", "SALADWeightsLoader"])
    return server, browser


def main(argv=None):
    from contextlib import ExitStack
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "workflows", help="folder for <name>.jpg (default workflows/)")
    ap.add_argument("--only", nargs="*", help="workflow names (without .json) to capture")
    ap.add_argument("--frontend-root", type=Path, help="a frontend static/ folder (default: the installed package's)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with ExitStack() as stack:
        _, browser = open_session(stack, args.frontend_root)
        for path in template_workflows():
            if args.only and path.stem not in args.only:
                continue
            jpg, info = capture(browser, json.loads(path.read_text()))
            dst = args.out / f"{path.stem}.jpg"
            dst.write_bytes(jpg)
            print(f"{dst.relative_to(ROOT) if dst.is_relative_to(ROOT) else dst}: {THUMB_W}x{THUMB_H}, "
                  f"{len(jpg) // 1024} KiB, zoom {info['scale']:.2f}")
    print(f"done in {time.time() - t0:.0f}s (frontend {fd.frontend_version(args.frontend_root)})")


if __name__ == "__main__":
    main()
