"""Cost of LiveView.update() (producer side) and of one render (viewer side), ratios vs a plain copy."""
import time, json, urllib.request
import numpy as np
from streamclust.liveview import LiveView
from streamclust.liveview_render import render_rgba, encode_png, cluster_palette

def best(f, n=30):
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return min(ts)

rng = np.random.default_rng(0)
for ny in (64, 256, 512):
    n, c = ny * ny, 6
    u = rng.random((n, c), dtype=np.float32); u /= u.sum(1, keepdims=True)
    lab = u.argmax(1)
    flags = [{"cluster": 1, "score": 0.9, "bbox": (1, 1, 5, 5), "n_positions": 16, "label": "x"}]
    with LiveView(scan_shape=(ny, ny), n_clusters=c) as v:
        t_copy = best(lambda: (u.copy(), lab.copy()))
        t_up = best(lambda: v.update(labels=lab, memberships=u, flags=flags, progress=(n // 2, n), counters={"a": 1}))
        t_own = best(lambda: v.update(labels=lab, memberships=u, copy=False))
        t_small = best(lambda: v.update(progress=(n // 2, n), counters={"a": 1}))
        t_rend = best(lambda: render_rgba(lab, u, (ny, ny), cluster_palette(c)), 10)
        rgba = render_rgba(lab, u, (ny, ny), cluster_palette(c))
        t_png = best(lambda: encode_png(rgba), 10)
        png = encode_png(rgba)
        def fetch():
            v.update(progress=(1, n)); urllib.request.urlopen(v.url + "map.png").read()
        t_http = best(fetch, 10)
    print(f"{ny}x{ny} c={c}: update(labels+memberships, copy) {t_up*1e6:8.1f} us = {t_up/t_copy:4.2f} x plain copy "
          f"({t_copy*1e6:.1f} us); update(copy=False) {t_own*1e6:6.1f} us; update(counters only) {t_small*1e6:5.1f} us; "
          f"render {t_rend*1e3:6.2f} ms, PNG {t_png*1e3:6.2f} ms ({len(png)/1e3:.0f} kB), GET map.png after update {t_http*1e3:6.2f} ms")
