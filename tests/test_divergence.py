"""Training that diverges stops (issue 24 item 6): the issue's ``lr=1e3`` on recipes/debug-recover.yaml blew the
weights up to 5e7 and reported the uniform model's perplexity as "recovered", exit 0. Now recovery ends with a
clear error (exit 2, no traceback), the pruned stages stay finished and ``--resume`` with a sane lr completes;
a recovered model worse than the pruned one is flagged in metrics.json and the summary."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

from prunelab.metrics import flag_recovery
from prunelab.run import main, summary
from prunelab.stages.recovery.config import RecoverySettings
from prunelab.stages.recovery.trainer import TrainingDiverged, check_divergence


class _Acc:
    device = torch.device("cpu")

    def reduce(self, t, reduction="sum"):
        return t

    def gather(self, t):
        return t


def _run(losses, params=None, scale=1.0, step=None):
    params = params if params is not None else [torch.nn.Parameter(torch.ones(3))]
    checkpoints = SimpleNamespace(due=lambda step, total: False)
    return SimpleNamespace(recorder=SimpleNamespace(losses=list(losses)), step=step or len(losses), total=100,
                           label="pruned", params=params, weight_scale=scale, checkpoints=checkpoints)


def _cfg(**loop):
    return RecoverySettings.model_validate({"data": {"source": {"path": "tests/data/tiny_corpus.txt"}},
                                            "loop": {"log_every": 1, **loop}, "optimizer": {"lr": 1e-3}})


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_non_finite_loss_stops(bad):
    with pytest.raises(TrainingDiverged, match="diverged: the loss at step 2"):
        check_divergence(_Acc(), _run([5.0, bad]), _cfg())


def test_an_exploding_loss_stops_and_a_noisy_one_does_not():
    check_divergence(_Acc(), _run([5.0, 6.0, 14.9]), _cfg())  # under 3 × 5
    with pytest.raises(TrainingDiverged, match="above 3 × 5"):
        check_divergence(_Acc(), _run([5.0, 6.0, 15.1]), _cfg())
    check_divergence(_Acc(), _run([5.0, 6.0, 15.1]), _cfg(divergence_factor=None))  # only non-finite values stop


def test_the_reference_is_the_first_loss_after_warm_up():
    cfg = RecoverySettings.model_validate({"data": {"source": {"path": "tests/data/tiny_corpus.txt"}},
                                           "loop": {"log_every": 1}, "optimizer": {"lr": 1e-3, "warmup_steps": 2}})
    check_divergence(_Acc(), _run([1.0, 9.0, 5.0, 14.0]), cfg)  # 14 < 3 × 5 (loss[2]); 9 > 3 × 1 is warm-up
    with pytest.raises(TrainingDiverged):
        check_divergence(_Acc(), _run([1.0, 9.0, 5.0, 16.0]), cfg)


def test_non_finite_or_exploded_weights_stop():
    with pytest.raises(TrainingDiverged, match="NaN/Inf"):
        check_divergence(_Acc(), _run([5.0], [torch.nn.Parameter(torch.tensor([1.0, math.nan]))]), _cfg())
    with pytest.raises(TrainingDiverged, match="reached 500"):
        check_divergence(_Acc(), _run([5.0], [torch.nn.Parameter(torch.tensor([500.0]))], scale=1.0), _cfg())
    check_divergence(_Acc(), _run([5.0], [torch.nn.Parameter(torch.tensor([50.0]))], scale=1.0), _cfg())


def test_divergence_factor_is_left_out_of_old_hashes():
    assert "divergence_factor" not in _cfg().model_dump(mode="json")["loop"]
    assert _cfg(divergence_factor=5.0).model_dump(mode="json")["loop"]["divergence_factor"] == 5.0


def test_recovered_worse_than_pruned_is_flagged():
    def ev(ppl):
        return {"wiki": {"ppl": ppl, "seq_len": 128, "tokens": 4096}}

    recover = {"pruned": {"steps": 6, "first_loss": 5.0, "final_loss": 4.0, "tokens_per_s": 1.0}}
    flagged = flag_recovery(recover, {"pruned": ev(300.0), "recovered": ev(400.0)})
    assert flagged["pruned"]["recovery_worse_than_pruned"] is True and flagged["pruned"]["worse_on"] == {"wiki": [300.0, 400.0]}
    assert flag_recovery(recover, {"pruned": ev(300.0), "recovered": ev(200.0)})["pruned"]["recovery_worse_than_pruned"] is False
    assert flag_recovery(recover, {"pruned": ev(300.0), "recovered": ev(math.nan)})["pruned"]["recovery_worse_than_pruned"]
    assert "recovery_worse_than_pruned" not in recover["pruned"]  # not changed in place
    metrics = {"recipe": "r", "model": {"params_before": 1, "params_after": 1, "layers_before": 1, "layers_after": 1},
               "eval": {}, "recover": flagged, "timing_s": {}}
    assert "WORSE than the pruned one on wiki" in summary(metrics, __import__("pathlib").Path("/nonexistent"))


def test_lr_1e3_stops_recovery_and_resume_with_a_sane_lr_completes(tmp_path, capsys):
    out = tmp_path / "runs"
    fast = ["stages.recover.control=false", "stages.recover.checkpoint.save_every=3"]  # the dense control: not needed here
    rc = main(["recipes/debug-recover.yaml", "stages.recover.optimizer.lr=1e3", *fast, "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and "stage 06-recover" in err and "diverged" in err, err
    run_dir = out / "debug-recover"
    assert (run_dir / "04-prune" / "done.json").is_file() and (run_dir / "05-eval_pruned" / "done.json").is_file()
    assert not (run_dir / "06-recover" / "done.json").exists()
    assert not list((run_dir / "06-recover").rglob("step-*")), "no checkpoint of the diverged weights"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "recovered" not in metrics["eval"] and "pruned" in metrics["eval"]
    rc = main(["recipes/debug-recover.yaml", *fast, "--output-dir", str(out), "--no-progress", "--resume"])
    err = capsys.readouterr().err
    assert rc == 0, err
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert "recovered" in metrics["eval"] and "recovery_worse_than_pruned" in metrics["recover"]["pruned"]
