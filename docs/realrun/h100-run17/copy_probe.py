"""Copy speed now, as calibrate measures it (a drift check between calibrate and the runs)."""
import sys, time
from realrun.backend import Backend
from realrun.calibrate import copy_curve
sizes = [352321536 // 4, 352321536]
points, dma = copy_curve(Backend("cuda"), sizes, 12)
print(f"{time.strftime('%T')} copy probe {sys.argv[1] if len(sys.argv) > 1 else ''}: " + ", ".join(
    f"{s / 1e6:.0f} MB engine {t * 1e3:.3f} ms dma {d * 1e3:.3f} ms" for (s, t), (_, d) in zip(points, dma)))
