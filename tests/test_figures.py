"""Sweep figures say what was simulated, draw bytes and times in units that suit them, and do not
draw a policy that ignores the budget at budgets it never used; report tables keep their width."""
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.lines import Line2D
from rich.table import Table

from sim.plots import axis, metric_vs_budget
from traces.cli import console


def sweep(metric: str, values: dict[str, list[float]]) -> pd.DataFrame:
    budgets = [2.0, 4.0, 8.0]
    rows = [{"policy": policy, "budget_gb": b, metric: v, "model": "mixtral-8x7b", "hardware": "h100",
             "trace_name": "mixtral-8x7b-gsm8k", "trace_origin": "Mixtral-8x7B [hub] on gsm8k", "dataset": "gsm8k"}
            for policy, series in values.items() for b, v in zip(budgets, series)]
    return pd.DataFrame(rows)


def test_bytes_moved_are_drawn_in_terabytes_when_they_reach_terabytes():
    fig = metric_vs_budget(sweep("bytes_h2d", {"lru": [3e14, 2e14, 1e14]}), "bytes_h2d")
    ax = fig.axes[0]
    assert ax.get_ylabel() == "host-to-GPU bytes (TB)"
    assert max(ax.lines[0].get_ydata()) == 300.0  # not 300,000 GB
    assert axis("bytes_h2d", 5e8) == ("host-to-GPU bytes (MB)", 1e-6)


def test_long_stalls_are_drawn_in_minutes_without_an_offset():
    fig = metric_vs_budget(sweep("stall_s", {"lru": [1200.0, 600.0, 300.0]}), "stall_s")
    ax = fig.axes[0]
    FigureCanvasAgg(fig).draw()
    assert ax.get_ylabel() == "stall (min)" and max(ax.lines[0].get_ydata()) == 20.0
    assert ax.yaxis.get_offset_text().get_text() == ""  # no "x 1e6" beside the axis


def test_the_title_names_model_hardware_trace_and_routing():
    fig = metric_vs_budget(sweep("hit_rate", {"lru": [0.2, 0.4, 0.6]}), "hit_rate")
    title = fig._suptitle.get_text()
    for part in ("model mixtral-8x7b", "hardware h100", "trace mixtral-8x7b-gsm8k", "routing Mixtral-8x7B [hub] on gsm8k"):
        assert part in title


def test_a_policy_that_ignores_the_budget_is_one_horizontal_line():
    fig = metric_vs_budget(sweep("hit_rate", {"lru": [0.2, 0.4, 0.6], "all_resident": [1.0, 1.0, 1.0]}), "hit_rate")
    lines = {line.get_label(): line for line in fig.axes[0].get_lines() if isinstance(line, Line2D)}
    resident = lines["all_resident (every expert resident, any budget)"]
    assert list(resident.get_xdata()) == [0, 1] and list(resident.get_ydata()) == [100.0, 100.0]  # axhline
    assert list(lines["lru"].get_xdata()) == [2.0, 4.0, 8.0]


def test_a_report_printed_to_a_pipe_keeps_tables_wider_than_80_columns(capsys):
    table = Table(*[f"budget {i} GB" for i in range(12)])
    table.add_row(*[f"{i * 7.3:.1f}%" for i in range(12)])
    console().print(table)
    lines = capsys.readouterr().out.splitlines()
    assert max(map(len, lines)) > 80 and "budget 11 GB" in lines[1] and "…" not in "".join(lines)


def test_the_trace_statistics_figure_labels_every_axis_and_keeps_its_legend_off_the_data():
    from traces import load_trace
    from traces.defaults import resolve_trace
    from traces.stats import cache_hit_rates, layer_stats
    from traces.stats_plot import stats_figure

    traces = {name: load_trace(resolve_trace(name)) for name in ("mixtral-8x7b-gsm8k", "default")}
    fig = stats_figure(pd.concat([layer_stats(t).assign(trace=n) for n, t in traces.items()]),
                       pd.concat([cache_hit_rates(t).assign(trace=n) for n, t in traces.items()]))
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        assert ax.get_ylabel() and ax.get_xlabel(), ax.get_title()
        assert ax.get_legend() is None, f"a legend inside '{ax.get_title()}' covers its curves"
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert {t.get_text() for t in legend.get_texts()} == set(traces)
    assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in fig.axes)
