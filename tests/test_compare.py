"""`reglue compare`: the baselines file, tables with sources and caveats, the plot, features-vs-features."""

import json
import warnings

import numpy as np
import yaml
from helpers import write_npz
from PIL import Image

from evaluation.compare import (
    BASELINES,
    caveats,
    features_distance,
    format_rows,
    load_baselines,
    load_ours,
    validate_baselines,
)
from reglue_cli.main import main


def test_baselines_file_is_valid_and_every_row_has_a_source():
    data = yaml.safe_load(BASELINES.read_text())
    assert validate_baselines(data) == []
    rows = load_baselines()
    assert len(rows) > 50 and all(r["source"] for r in rows)
    assert {r["group"] for r in rows} == {"sit-b2", "sit-xl2", "cfg", "ablation", "uncond"}
    broken = {"defaults": data["defaults"], "rows": [{"group": "sit-b2", "method": "X", "model": "SiT-B/2",
                                                      "steps": 1, "fid": "12"}]}
    problems = validate_baselines(broken)
    assert any("missing source" in p for p in problems) and any("fid is not a number" in p for p in problems)
    broken["rows"][0].update(source="x", fid=1.0, conditioning="uncond")
    assert any("conditioning 'uncond'" in p for p in validate_baselines(broken))


def test_unconditional_rows_of_reglue_table_2b_are_marked(tmp_path, capsys):
    rows = load_baselines()
    uncond = {r["method"]: r for r in rows if r["conditioning"] == "unconditional"}
    assert {m: r["fid"] for m, r in uncond.items()} == {"SiT": 59.8, "ReDi": 43.6, "REG": 29.7, "REGLUE": 28.7}
    for r in uncond.values():
        assert (r["group"], r["model"], r["steps"], r["cfg"]) == ("uncond", "SiT-B/2", 400_000, None)
        assert r["source"] == "REGLUE Table 2(b)"
    conditional = [r for r in rows if r["model"] == "SiT-B/2" and r["steps"] == 400_000 and r not in uncond.values()]
    assert conditional and all(r["conditioning"] == "class-conditional" for r in conditional)
    assert all(r["conditioning"] == "class-conditional" for r in load_baselines(["sit-b2", "ablation"]))
    # beside class-conditional rows they are marked and a caveat says so; alone, no caveat
    assert not any("Unconditional" in n for n in caveats(load_baselines(["uncond"])))
    code = main(["compare", "--baselines", "sit-b2,uncond"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [line for line in out.splitlines() if "REGLUE Table 2(b)" in line]
    assert len(lines) == 4 and all("[uncond]" in line for line in lines)
    assert not any("[uncond]" in line for line in out.splitlines() if "12.90" in line)
    assert "Unconditional and class-conditional numbers are mixed" in out
    # our run of an -uncond preset is unconditional too, and gets the caveat beside the default sit-b2 rows
    ours = load_ours([str(_fake_run(tmp_path, "b2-uncond", fid=30.0, preset="sit-b2-reglue-uncond"))])
    assert ours[0]["conditioning"] == "unconditional"
    text = format_rows(ours + load_baselines(["sit-b2"]), "markdown")
    assert "b2-uncond [uncond]" in text and "Unconditional and class-conditional numbers are mixed" in text
    assert not any("Unconditional" in n for n in caveats(ours + load_baselines(["uncond"])))


def _fake_run(root, name, sampler="sde", step=400_000, fid=20.0, preset="sit-b2-reglue",
              decoder="stabilityai/sd-vae-ft-ema"):
    run = root / name / "eval"
    run.mkdir(parents=True)
    settings = {"sampler": sampler, "steps": 250, "guidance": {"scale": 1.0, "cls_scale": 1.0, "channels": "all",
                                                               "interval": [0.0, 0.9]}}
    metrics = {"fid": fid, "sfid": 6.0, "inception_score": 80.0, "precision": 0.6, "recall": 0.6, "n": 50000,
               "inception_weights_sha256": "6726825d" + "0" * 56,
               "sample_info": {"preset": preset, "step": step, "decoder": decoder,
                               "settings": settings}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    return root / name


def test_table_with_two_runs_shows_published_numbers_with_sources(tmp_path, capsys):
    a = _fake_run(tmp_path, "b2-reglue", fid=13.4)
    b = _fake_run(tmp_path, "b2-sit", fid=34.1, preset="sit-b2", step=300_000)
    code = main(["compare", str(a), str(b), "--baselines", "sit-b2"])
    out = capsys.readouterr().out
    assert code == 0
    for text in ("12.90", "REGLUE Tables 1-2", "33.00", "SiT paper via REG Table 1", "b2-reglue", "13.40", "300K"):
        assert text in out
    lines = [line for line in out.splitlines() if "b2-reglue" in line]
    assert lines and lines[0].startswith("*")
    assert "Samplers differ" not in out


def test_an_ode_run_beside_sde_rows_gets_a_caveat(tmp_path):
    rows = load_ours([str(_fake_run(tmp_path, "ode-run", sampler="ode-heun"))]) + load_baselines(["sit-b2"])
    notes = caveats(rows)
    assert any("Samplers differ" in n and "ODE" in n for n in notes)
    assert "Samplers differ" in format_rows(rows, "markdown")


def test_decoder_caveat_only_when_the_decoders_really_differ(tmp_path):
    same = load_ours([str(_fake_run(tmp_path, "hub-id"))]) + load_baselines(["sit-b2"])
    assert not any("decoders differ" in n for n in caveats(same))  # hub id vs the baselines' short name
    other = load_ours([str(_fake_run(tmp_path, "mse", decoder="/models/sd-vae-ft-mse/"))]) + load_baselines(["sit-b2"])
    assert any("decoders differ (sd-vae-ft-ema, sd-vae-ft-mse)" in n for n in caveats(other))


def test_other_formats_and_stand_in_marks(tmp_path):
    run = _fake_run(tmp_path, "demo", preset="tiny-reglue")
    rows = load_ours([str(run)])
    assert rows[0]["stand_in"]
    text = format_rows(rows + load_baselines(["ablation"]), "table")
    assert "*!" in text and "stand-ins (random-weight or toy models)" in text
    csv_text = format_rows(rows, "csv")
    assert csv_text.splitlines()[0].startswith(",method,model,steps,FID")
    assert json.loads(format_rows(rows, "json"))["rows"][0]["method"] == "demo"


def test_plot_is_written_and_opens(tmp_path, capsys):
    run = _fake_run(tmp_path, "xl", fid=9.0, step=100_000, preset="sit-xl2-reglue")
    code = main(["compare", str(run), "--baselines", "sit-xl2", "--plot", str(tmp_path / "fid.png")])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "fid.png").stat().st_size > 10_000
    with Image.open(tmp_path / "fid.png") as image:
        assert image.format == "PNG" and image.size[0] > 600


TABLE_1_BY_FID = ["(n) REGLUE, DINOv3-B", "(m) REGLUE", "(l) non-linear multi-layer", "(k) non-linear + REG",
                  "b2 (ours)", "(j) non-linear + align patch", "(i) non-linear", "(h) REG",
                  "(g) CLS joint + align patch", "(e) ReDi + align patch", "(d) ReDi", "(b) REPA", "(c) CLS joint",
                  "(a) SiT-B/2", "(f) CLS joint + align CLS"]  # REGLUE Table 1 by FID, our 14.0 between k and j


def _run_with_steps(root, name, points, preset="tiny-reglue", weights_sha="8b7c653f" + "0" * 56):
    """A run directory with one metrics file per (step, fid), scored with ``weights_sha`` (random ones by default)."""
    run = _fake_run(root, name, step=points[0][0], fid=points[0][1], preset=preset)
    template = json.loads((run / "eval" / "metrics.json").read_text())
    (run / "eval" / "metrics.json").unlink()
    for step, fid in points:
        template.update(fid=fid, inception_weights_sha256=weights_sha)
        template["sample_info"]["step"] = step
        (run / "eval" / f"{step:07d}.json").write_text(json.dumps(template))
    return run


def _drawn(fig):
    """The figure drawn with Agg, and its renderer."""
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _ranked_axes(fig):
    """The axes whose y ticks are labels (the ranked charts)."""
    return [ax for ax in fig.axes if any(t.get_text() and not t.get_text()[0].isdigit() for t in ax.get_yticklabels())]


def _labels_top_down(ax, renderer):
    """An axes' y tick labels in the order a reader sees them, top first."""
    labels = [t for t in ax.get_yticklabels() if t.get_text()]
    return [t.get_text() for t in sorted(labels, key=lambda t: -t.get_window_extent(renderer).y0)]


def _drawn_texts(fig, renderer):
    """Every text the reader sees: titles, axis labels, annotations, legend entries, and the tick labels inside
    their axis' span (matplotlib keeps labels of ticks beyond the view, undrawn)."""
    import matplotlib.text

    tick_labels = {id(t): (ax, axis) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
                   for t in axis.get_ticklabels(which="both")}
    texts = []
    for text in fig.findobj(matplotlib.text.Text):
        if not text.get_visible() or not text.get_text().strip():
            continue
        box = text.get_window_extent(renderer)
        if id(text) in tick_labels:
            ax, axis = tick_labels[id(text)]
            span = ax.get_window_extent(renderer)
            centre, (low, high) = ((box.x0 + box.x1) / 2, (span.x0, span.x1)) if axis is ax.xaxis else \
                ((box.y0 + box.y1) / 2, (span.y0, span.y1))
            if not low - 1 <= centre <= high + 1:
                continue
        texts.append((text.get_text(), box))
    return texts


def _overlapping(fig):
    """Pairs of drawn texts whose boxes intersect."""
    texts = _drawn_texts(fig, _drawn(fig))
    return [(a, b) for i, (a, box_a) in enumerate(texts) for b, box_b in texts[i + 1:] if box_a.overlaps(box_b)]


def test_the_overlap_check_sees_overlapping_labels():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 3))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for method in ("(a) SiT-B/2", "(b) REPA"):  # the old plot: every Table 1 row labelled at one x
        ax.annotate(method, (0.5, 0.5), xytext=(4, 3), textcoords="offset points")
    assert _overlapping(fig) == [("(a) SiT-B/2", "(b) REPA")]


def test_no_text_of_the_fid_figure_is_drawn_over_another(tmp_path):
    from evaluation.compare import fid_figure

    demo = load_ours([str(_run_with_steps(tmp_path, "demo", [(100, 8210.4), (200, 8189.1)]))])
    xl = load_ours([str(_run_with_steps(tmp_path, "xl", [(100_000, 9.0), (200_000, 5.1), (400_000, 3.5)],
                                        preset="sit-xl2-reglue", weights_sha="6726825d" + "0" * 56))])
    b2 = load_ours([str(_fake_run(tmp_path, "b2", fid=14.0))])
    for rows in (demo + load_baselines(["ablation"]), xl + load_baselines(["sit-xl2"]),
                 b2 + demo + load_baselines(["sit-b2"]), xl + b2 + demo + load_baselines(None),
                 load_baselines(["cfg"]), demo):
        fig = fid_figure(rows)
        assert _overlapping(fig) == [], {r["group"] for r in rows}


def test_the_ranked_chart_orders_rows_by_fid_best_on_top_with_our_run_highlighted(tmp_path):
    from evaluation.compare import fid_figure

    fig = fid_figure(load_baselines(["ablation"]) + load_ours([str(_fake_run(tmp_path, "b2", fid=14.0))]))
    renderer = _drawn(fig)
    (ax,) = fig.axes  # 15 points at one training length: a ranked chart and no curve
    assert _labels_top_down(ax, renderer) == TABLE_1_BY_FID
    assert "400K training steps" in ax.get_title(loc="left")
    colours = {t.get_text(): t.get_color() for t in ax.get_yticklabels()}
    assert colours["b2 (ours)"] != colours["(m) REGLUE"] and len(set(colours.values())) == 2
    values = sorted((t for t in ax.texts), key=lambda t: -t.get_window_extent(renderer).y0)
    assert [float(t.get_text()) for t in values][:6] == [12.3, 12.9, 13.3, 13.7, 14.0, 14.1]
    tall = fid_figure(load_baselines(None))
    assert tall.get_size_inches()[1] > fig.get_size_inches()[1] + 0.25 * 40  # at least 40 rows more, 1/4 in each


def test_stand_in_numbers_are_drawn_on_their_own_panel(tmp_path):
    from evaluation.compare import fid_figure

    demo = load_ours([str(_run_with_steps(tmp_path, "demo", [(100, 8210.4), (200, 8189.1)]))])
    assert all(r["stand_in"] for r in demo)
    fig = fid_figure(load_baselines(["ablation"]) + demo)
    renderer = _drawn(fig)
    paper, stand_in = fig.axes
    assert "stand-in" not in paper.get_title(loc="left").lower()
    assert _labels_top_down(paper, renderer) == [m for m in TABLE_1_BY_FID if m != "b2 (ours)"]
    assert paper.get_xlim()[1] < 100  # the paper's axis never stretches to the stand-in FID of 8000
    assert "Stand-in numbers" in stand_in.get_title(loc="left")
    (curve,) = stand_in.get_lines()  # two steps: a curve, and on the stand-in panel only
    assert list(curve.get_xdata()) == [100, 200] and list(curve.get_ydata()) == [8210.4, 8189.1]
    assert [t.get_text() for t in stand_in.get_legend().get_texts()] == ["demo (ours)"]
    # one stand-in number alone is ranked on the stand-in panel too, never beside the paper's rows
    one = load_ours([str(_run_with_steps(tmp_path, "one", [(200, 8189.1)]))])
    fig = fid_figure(load_baselines(["ablation"]) + one)
    renderer = _drawn(fig)
    paper, stand_in = fig.axes
    assert "one (ours)" not in _labels_top_down(paper, renderer)
    assert _labels_top_down(stand_in, renderer) == ["one (ours)"] and "Stand-in" in stand_in.get_title(loc="left")


def test_curves_only_for_series_with_several_training_lengths(tmp_path):
    from evaluation.compare import fid_figure

    single = load_ours([str(_fake_run(tmp_path, "b2", fid=14.0))])
    fig = fid_figure(single + load_baselines(["ablation"]))
    assert all(len(line.get_xdata()) == 1 for ax in fig.axes for line in ax.get_lines())
    xl = load_ours([str(_run_with_steps(tmp_path, "xl", [(100_000, 9.0), (200_000, 5.1), (400_000, 3.5)],
                                        preset="sit-xl2-reglue", weights_sha="6726825d" + "0" * 56))])
    fig = fid_figure(xl + load_baselines(["sit-xl2"]))
    renderer = _drawn(fig)
    ranked, curves = fig.axes
    drawn = {line.get_label(): list(zip(line.get_xdata(), line.get_ydata())) for line in curves.get_lines()}
    assert drawn["xl (ours)"] == [(100_000, 9.0), (200_000, 5.1), (400_000, 3.5)]
    assert drawn["REPA (SiT-XL/2) (published)"] == [  # reference_stats/baselines.yaml
        (50_000, 52.3), (100_000, 19.4), (200_000, 11.1), (400_000, 7.9), (1_000_000, 6.4), (4_000_000, 5.9)]
    assert "REPA-E (SiT-XL/2) (published)" not in drawn  # one published point: ranked, not a curve
    # the ranked chart holds the one-point rows and every curve at the length most points share (400K)
    assert _labels_top_down(ranked, renderer) == [
        "REGLUE (SiT-XL/2)", "REG (SiT-XL/2)", "xl (ours)", "REPA-E (SiT-XL/2)",
        "LightningDiT (LightningDiT-XL/1) @ 320K", "ReDi (SiT-XL/2)", "REPA (SiT-XL/2)", "SiT (SiT-XL/2)",
        "DiT (DiT-XL/2)"]


def test_bad_inputs_are_one_line(tmp_path, capsys):
    (tmp_path / "x.json").write_text('{"loss": 1}')
    (tmp_path / "empty").mkdir()
    for argv, message in [([str(tmp_path / "x.json")], "not a metrics file"),
                          ([str(tmp_path / "empty")], "no metrics.json"),
                          (["--baselines", "sit-b3"], "unknown group"),
                          ([str(tmp_path / "a.h5"), str(tmp_path / "b.h5")], "not a features file")]:
        code = main(["compare", *argv])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_features_distance_equals_the_eval_suite(weights, tmp_path):
    from evaluation.evaluate import EvalOptions, evaluate

    rng = np.random.default_rng(9)
    a = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (14, 32, 32, 3), dtype=np.uint8)
    write_npz(tmp_path / "a.npz", a)
    write_npz(tmp_path / "b.npz", b)
    options = dict(cache_dir=str(tmp_path / "cache"), progress=False, pr_precision="fp32")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scored = evaluate(tmp_path / "a.npz", str(tmp_path / "b.npz"), weights,
                          EvalOptions(features_out=str(tmp_path / "fa.h5"), **options))
        evaluate(tmp_path / "b.npz", str(tmp_path / "b.npz"), weights,
                 EvalOptions(features_out=str(tmp_path / "fb.h5"), **options))
    result = features_distance(tmp_path / "fa.h5", tmp_path / "fb.h5")
    for key in ("fid", "sfid", "precision", "recall"):  # the same statistics and algebra: the same bits
        assert result[key] == scored[key], key


def test_our_run_is_unconditional_when_its_samples_say_num_classes_0(tmp_path):
    from evaluation.compare import _row_from_metrics

    for info, expected in (({"preset": "tiny-sit", "num_classes": 0}, "unconditional"),
                           ({"preset": "tiny-sit", "num_classes": 10}, "class-conditional"),
                           ({"preset": "sit-b2-uncond"}, "unconditional")):  # samples from before num_classes
        path = tmp_path / "metrics.json"
        path.write_text(json.dumps({"fid": 30.0, "sample_info": info}))
        assert _row_from_metrics(path, "ours")["conditioning"] == expected


def test_a_run_whose_samples_record_stand_ins_is_marked_even_with_the_published_inception(tmp_path):
    run = _fake_run(tmp_path, "toy", preset="demo-sit", decoder="/work/demo_out/vae")
    assert not load_ours([str(run)])[0]["stand_in"]  # published Inception, a real-looking decoder: nothing to see
    metrics = json.loads((run / "eval" / "metrics.json").read_text())
    metrics["sample_info"]["stand_ins"] = ["decoder", "vae"]
    (run / "eval" / "metrics.json").write_text(json.dumps(metrics))
    assert load_ours([str(run)])[0]["stand_in"]
