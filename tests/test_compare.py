"""`reglue compare`: the baselines file, tables with sources and caveats, the plot, features-vs-features."""

import json
import warnings

import numpy as np
import yaml
from PIL import Image
from test_eval_inception import _npz, weights  # noqa: F401,F811  (the random-weights Inception fixture)

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
    assert "*!" in text and "random-weight stand-ins" in text
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


def test_features_distance_equals_the_eval_suite(weights, tmp_path):  # noqa: F811
    from evaluation.evaluate import EvalOptions, evaluate

    rng = np.random.default_rng(9)
    a = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, (14, 32, 32, 3), dtype=np.uint8)
    _npz(tmp_path / "a.npz", a)
    _npz(tmp_path / "b.npz", b)
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
