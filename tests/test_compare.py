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
    assert {r["group"] for r in rows} == {"sit-b2", "sit-xl2", "cfg", "ablation", "uncond", "frontier"}
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


FRONTIER_METHODS = {"RAE", "RAEv2", "REPA-E", "DDT", "LightningDiT", "REG", "SR-DiT", "SPRINT + REPA", "PixelDiT"}


def test_the_frontier_rows_load_validate_and_carry_the_comparison_fields():
    from evaluation.compare import CHOICES, GROUPS

    rows = load_baselines(["frontier"])
    assert "frontier" in GROUPS and {r["method"] for r in rows} == FRONTIER_METHODS
    for r in rows:
        assert r["source"] and (r["group"] == "frontier" or "frontier" in r["also_in"]), r
        for key, allowed in CHOICES.items():
            assert r[key] is None or r[key] in allowed, (key, r)
        assert r["nfe"] is None or (isinstance(r["nfe"], int) and r["nfe"] > 0)
        assert (r["guidance_method"] == "none") == (r["cfg"] is None), r  # unguided and guided rows apart
        if r["group"] == "frontier":
            assert r["note"] and "onfirmed" in r["note"], r  # each says what was checked against its source
    for method in ("RAE", "REPA-E", "LightningDiT", "REG"):  # unguided and guided numbers: separate rows
        assert {r["cfg"] is None for r in rows if r["method"] == method} == {True, False}, method
    # rows of other groups that join frontier (also_in) appear once under 'all', once under their own group
    everything = load_baselines(None)
    assert all(sum(r == other for other in everything) == 1 for r in rows)
    for r in rows:
        if r["group"] != "frontier":
            assert r in load_baselines([r["group"]])
    # the older rows get the fields from what they already say: decoder, guidance, sampler, the defaults
    for r in load_baselines(["sit-b2", "cfg"]):
        assert r["latent"] == "sd-vae" or r["decoder"] != "sd-vae-ft-ema"
        assert r["guidance_method"] != "none" if r["cfg"] else r["guidance_method"] == "none"
    assert all(r["labels"] is None for r in load_baselines(["uncond"]))  # unconditional: no labels at all


def test_a_bad_comparison_field_is_refused_by_name():
    data = yaml.safe_load(BASELINES.read_text())
    good = {"group": "frontier", "method": "X", "model": "M", "steps": None, "fid": 1.0, "source": "s",
            "latent": None, "guidance_method": None, "labels": None, "reference": None, "nfe": None}
    assert validate_baselines({"defaults": data["defaults"], "rows": [good]}) == []
    for key, value in (("latent", "sdvae"), ("guidance_method", "cfg-interval"), ("labels", "uniform"),
                       ("reference", "inception"), ("nfe", 0), ("nfe", "250"), ("nfe", True), ("sampler", 250),
                       ("also_in", ["frontiers"]), ("cfg", 2.3)):
        problems = validate_baselines({"defaults": data["defaults"], "rows": [{**good, key: value}]})
        assert len(problems) == 1 and key in problems[0] and repr(value) in problems[0], (key, problems)


def _metrics(tmp_path, name="m", sampler="sde", steps=250, scale=1.0, interval=(0.0, 0.9), balanced=False,
             decoder="stabilityai/sd-vae-ft-ema", reference="/refs/VIRTUAL_imagenet256_labeled.npz", settings=None,
             **info):
    """A synthetic `reglue eval --json` file and the row compare makes of it (``settings``: more sampling settings,
    ``info``: more sample_info)."""
    from evaluation.compare import _row_from_metrics

    settings = {"sampler": sampler, "steps": steps, "balanced": balanced, **(settings or {}),
                "guidance": {"scale": scale, "cls_scale": scale, "channels": "all", "interval": list(interval)}}
    metrics = {"fid": 2.0, "n": 50000, "inception_weights_sha256": "6726825d" + "0" * 56, "reference": reference,
               "reference_sha256": "ab" * 32 if reference else None,
               "sample_info": {"preset": "sit-xl2-reglue", "step": 400_000, "decoder": decoder, "settings": settings,
                               **info}}
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(metrics))
    return _row_from_metrics(path, name)


def test_our_rows_record_the_comparison_fields_from_the_eval_json(tmp_path):
    from evaluation.reference import registry

    plain = _metrics(tmp_path)
    assert (plain["latent"], plain["guidance_method"], plain["labels"], plain["nfe"]) == ("sd-vae", "none", "random",
                                                                                          250)
    assert _metrics(tmp_path, balanced=True)["labels"] == "balanced"
    assert _metrics(tmp_path, scale=2.8)["guidance_method"] == "cfg+interval"  # [0, 0.9]: an interval
    assert _metrics(tmp_path, scale=2.8, interval=(0.0, 1.0))["guidance_method"] == "cfg"
    assert _metrics(tmp_path, scale=1.0, interval=(0.0, 1.0))["guidance_method"] == "none"
    assert _metrics(tmp_path, scale=2.0, settings={"guide": "runs/small/0100000.pt"})["guidance_method"] == \
        "autoguidance"
    assert _metrics(tmp_path, sampler="ode-euler", steps=50)["nfe"] == 50
    assert _metrics(tmp_path, sampler="ode-heun", steps=125)["nfe"] == 2 * 125  # Heun: two evaluations a step
    assert _metrics(tmp_path, scale=4.0)["nfe"] == 250  # guidance's second pass is not counted
    assert _metrics(tmp_path, nfe=400)["evaluations"] == 400  # the samples' own count, when recorded
    for decoder, latent in (("tiny", "stand-in"), ("/models/sd-vae-ft-mse/", "sd-vae"), ("/runs/my-vae", "other")):
        assert _metrics(tmp_path, decoder=decoder)["latent"] == latent, decoder
    assert _metrics(tmp_path, decoder="/work/demo_out/vae", stand_ins=["decoder"])["latent"] == "stand-in"
    assert _metrics(tmp_path, num_classes=0)["labels"] is None  # unconditional: no labels to sample
    assert _metrics(tmp_path, sampler="ode-euler", steps=50, settings={"time_shift": 3.0})["sampler"] == \
        "ode-euler 50, time shift 3"
    # the reference: ADM's batch by its registered sha256, or by its file name while the registry has no sha256
    entry = registry()["imagenet256"]
    assert (_metrics(tmp_path)["reference"] == "adm") == (not entry["sha256"])
    assert _metrics(tmp_path, reference="/refs/my_own_stats.npz")["reference"] == "other"
    assert _metrics(tmp_path, reference=None)["reference"] is None


def test_a_field_caveat_appears_exactly_when_our_run_and_the_published_rows_differ(tmp_path):
    from evaluation.compare import FIELD_CAVEATS, field_caveats

    published = load_baselines(["sit-b2"])  # SD-VAE, no guidance, random labels, ADM reference, SDE 250
    assert field_caveats([_metrics(tmp_path)] + published) == []  # all agree
    assert not any("differ" in n and "for ours" in n for n in caveats([_metrics(tmp_path)] + published))
    assert field_caveats(published) == [] and field_caveats([_metrics(tmp_path)]) == []  # one side only
    for changed, what, values in (
            (dict(balanced=True), "Label sampling differs", "(balanced for ours; random for published rows)"),
            (dict(sampler="ode-euler", steps=50), "Sampler NFE differs", "(50 for ours; 250 for published rows)"),
            (dict(scale=2.8), "Guidance methods differ", "(cfg+interval for ours; none for published rows)"),
            (dict(decoder="tiny"), "Latent spaces differ", "(stand-in for ours; sd-vae for published rows)"),
            (dict(reference="/refs/mine.npz"), "Reference statistics differ",
             "(other for ours; adm for published rows)")):
        notes = field_caveats([_metrics(tmp_path, **changed)] + published)
        assert len(notes) == 1 and notes[0].startswith(f"{what} {values}: "), (changed, notes)
    # beside the frontier: each field's published values come from the rows, those leaving it out are counted
    frontier = load_baselines(["frontier"])
    ours = _metrics(tmp_path)
    notes = {n.split(" (")[0]: n for n in field_caveats([ours] + frontier)}
    assert set(notes) == {what for key, what, _ in FIELD_CAVEATS if {r[key] for r in frontier} - {None, ours[key]}}
    assert "Latent spaces differ" in notes and "Reference statistics differ" not in notes  # the anchors: ADM or unsaid
    latents = sorted({r["latent"] for r in frontier} - {None})
    unstated = sum(r["latent"] is None for r in frontier)
    assert notes["Latent spaces differ"].startswith(
        f"Latent spaces differ (sd-vae for ours; {', '.join(latents)} for published rows; not stated for "
        f"{unstated} published row")
    # a published row that states nothing never makes a caveat
    silent = [{**r, **dict.fromkeys(("latent", "guidance_method", "labels", "reference", "nfe"))} for r in frontier]
    assert field_caveats([_metrics(tmp_path, balanced=True, decoder="tiny")] + silent) == []


def test_compare_baselines_frontier_prints_the_anchors(tmp_path, capsys):
    code = main(["compare", "--baselines", "frontier"])
    out = capsys.readouterr().out
    assert code == 0
    rows = load_baselines(["frontier"])
    for r in rows:
        line = next(line for line in out.splitlines() if r["source"] in line and f"{r['fid']:.2f}" in line)
        for key in ("latent", "guidance_method", "labels", "reference"):
            assert (r[key] or "?") in line, (key, line)
    rae = [r for r in rows if r["method"] == "RAE"]
    assert sum("arXiv 2510.11690" in line for line in out.splitlines()) == len(rae) == 2
    code = main(["compare", "--baselines", "all"])
    everything = capsys.readouterr().out
    assert all(r["source"] in everything for r in rows)
    assert sum("arXiv 2510.11690" in line for line in everything.splitlines()) == 2  # once each under 'all'
    # our run beside the anchors: the caveats name both sides
    run = _fake_run(tmp_path, "xl", fid=2.5, preset="sit-xl2-reglue")
    code = main(["compare", str(run), "--baselines", "frontier"])
    out = capsys.readouterr().out
    assert code == 0 and "Latent spaces differ (sd-vae for ours;" in out and "Label sampling differs" in out
