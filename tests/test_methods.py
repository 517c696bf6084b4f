"""The method registry: a method registered here, in the test file only, is accepted by
params validation, computed by explain, scored by evaluate and shown in the report."""
import inspect

import numpy as np
import pytest
import torch
import yaml

from attnlab import methods
from attnlab.config import ConfigError, parse_params

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


@pytest.fixture
def magnitude():
    """A toy method that ignores the model: |x| summed over each item's features."""
    @methods.register("magnitude", items=("sequence", "spacetime", "streams"), needs=(),
                      summary="|x| summed per item (a test's toy method)", default=False)
    def magnitude(batch):
        return batch.items.from_input(batch.x.abs())

    yield "magnitude"
    methods.unregister("magnitude")


def test_a_registered_method_runs_through_explain_evaluate_and_report(magnitude, tmp_path):
    from attnlab.pipeline import run

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    motion = params["motion"]
    motion["model"].update(d_model=16, nhead=2, num_layers=1, dim_feedforward=32)
    motion["train"].update(epochs=2, batch_size=20)
    motion["explain"].update(methods=["rollout", "magnitude"], examples=1, samples=None)   # every test sample
    motion["evaluate"].update(steps=5, ablation=False)
    motion["report"]["examples"] = 1
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"experiments": ["motion"], "motion": motion}))
    assert parse_params(yaml.safe_load(path.read_text())).motion.explain.methods == ["rollout", "magnitude"]

    argv = ["motion", "--params", str(path), "--data", str(tmp_path / "data")]
    for stage in ("prepare", "train", "extract", "aggregate", "explain", "evaluate", "report"):
        run(stage, argv, progress=False)
    data = tmp_path / "data" / "motion"
    x = np.load(data / "prepare" / "dataset.npz")["x_test"]
    expected = np.abs(x).sum(2)                                   # literal: |x| per timestep, rows to 1
    expected /= expected.sum(1, keepdims=True)
    got = np.load(data / "explain" / "importance.npz")
    np.testing.assert_allclose(got["magnitude"], expected, rtol=1e-5)
    assert set(got.files) == {"magnitude", "rollout", "target", "y"}
    evaluated = __import__("json").loads((data / "evaluate" / "metrics.json").read_text())
    assert set(evaluated["faithfulness"]["deletion_auc"]) == {"magnitude", "rollout", "random"}
    html = (data / "report" / "report.html").read_text()
    assert "magnitude = |x| summed per item (a test&#x27;s toy method)" in html
    assert "<td>magnitude</td>" in html


def test_the_toy_method_runs_on_every_item_kind_it_declares(magnitude):
    """The same function gives per-item importance for sequences, video patches and
    streams, each checked against a literal sum over the item's input values."""
    from attnlab.attribution import Batch, SequenceItems, SpaceTimeItems, StreamItems

    g = torch.Generator().manual_seed(0)
    method = methods.get("magnitude")
    run = lambda x, items: method(Batch(x=x, target=torch.zeros(2, dtype=torch.long), items=items,  # noqa: E731
                                        logits=None, options=None))
    x = torch.randn(2, 5, 3, generator=g)
    expected = x.abs().sum(2)
    torch.testing.assert_close(run(x, SequenceItems(5)), expected / expected.sum(1, keepdim=True))
    clip = torch.randn(2, 3, 1, 8, 8, generator=g)                  # 3 frames of 2 x 2 patches of 4 x 4
    per_patch = torch.tensor([[[clip[b, f, 0, 4 * r:4 * r + 4, 4 * c:4 * c + 4].abs().sum() for r in range(2)
                                for c in range(2)] for f in range(3)] for b in range(2)]).flatten(1)
    torch.testing.assert_close(run(clip, SpaceTimeItems(12, patch=4, split=None)),
                               per_patch / per_patch.sum(1, keepdim=True))
    packed = torch.randn(2, 5, 4, 4, generator=g)                   # streams of 2 and 3 channels
    streams = torch.stack([packed[:, :2].abs().sum((1, 2, 3)), packed[:, 2:].abs().sum((1, 2, 3))], 1)
    torch.testing.assert_close(run(packed, StreamItems((2, 3), weights=None)),
                               streams / streams.sum(1, keepdim=True))


def test_params_refuse_a_method_the_experiment_cannot_run():
    with pytest.raises(ConfigError, match=r"video\.explain\.methods: method 'flow' is not defined for "
                                          r"spacetime items; accepted for spacetime items: raw, received"):
        parse_params({"experiments": ["video"], "video": {"explain": {"methods": ["rollout", "flow"]}}})
    with pytest.raises(ConfigError, match=r"fusion\.explain\.methods: method 'rollout' is not defined for streams"):
        parse_params({"experiments": ["fusion"], "fusion": {"explain": {"methods": ["rollout"]}}})
    with pytest.raises(ConfigError, match=r"motion\.explain\.methods: unknown method 'lime'"):
        parse_params({"experiments": ["motion"], "motion": {"explain": {"methods": ["lime"]}}})
    with pytest.raises(ConfigError, match=r"methods listed twice: \['raw'\]"):
        parse_params({"experiments": ["motion"], "motion": {"explain": {"methods": ["raw", "raw"]}}})


def test_a_method_that_cannot_explain_a_kinds_models_is_refused_when_params_load():
    """``unsupported`` names experiment kinds whose models a method cannot explain although
    their item kind matches: listing it is refused with the method's reason, and the
    kind's defaults leave it out while other kinds of the same item kind keep it."""
    @methods.register("no_conv_rule", items=("sequence",), needs=("module",), summary="test method",
                      unsupported={"frames": "no rule for the per-frame CNN"})
    def _method(batch):
        return batch.x.abs().sum(-1)

    try:
        with pytest.raises(ConfigError, match=r"frames\.explain\.methods: method 'no_conv_rule' cannot explain "
                                              r"frames models: no rule for the per-frame CNN"):
            parse_params({"experiments": ["frames"], "frames": {"explain": {"methods": ["raw", "no_conv_rule"]}}})
        frames = parse_params({"experiments": ["frames"], "frames": {}}).frames
        assert "no_conv_rule" not in frames.explain.methods and "raw" in frames.explain.methods
        listed = parse_params({"experiments": ["motion"], "motion": {"explain": {"methods": ["no_conv_rule"]}}})
        assert listed.motion.explain.methods == ["no_conv_rule"]
        assert methods.names("sequence", experiment="frames") == [
            m for m in methods.names("sequence") if m != "no_conv_rule"]
    finally:
        methods.unregister("no_conv_rule")


def test_methods_without_rules_for_hugging_faces_timesformer_are_refused_for_it():
    for method in ("alti", "attnlrp"):
        with pytest.raises(ConfigError, match=rf"video: explain\.methods: method '{method}' cannot explain "
                                              r"model\.arch 'hf_timesformer': no .* TimeSformer"):
            parse_params({"experiments": ["video"], "video": {"model": {"arch": "hf_timesformer"},
                                                              "explain": {"methods": ["rollout", method]}}})
        divided = parse_params({"experiments": ["video"], "video": {"explain": {"methods": ["rollout", method]}}})
        assert divided.video.explain.methods == ["rollout", method]


def test_default_methods_come_from_the_registry(magnitude):
    cfg = parse_params({"experiments": ["video"], "video": {}}).video
    assert cfg.explain.methods == [m.name for m in methods.registry().values()
                                   if m.supports("spacetime") and m.default and "video" not in m.unsupported]
    assert "flow" not in cfg.explain.methods and "magnitude" not in cfg.explain.methods


def test_registration_errors_name_the_problem():
    with pytest.raises(ValueError, match="already registered for sequence items"):
        methods.register("rollout", items=("sequence",))(lambda batch: None)
    with pytest.raises(ValueError, match=r"items=\['pixels'\]; expected some of"):
        methods.register("x", items=("pixels",), needs=("attention",), summary="x")
    with pytest.raises(ValueError, match="a new method needs 'needs' and 'summary'"):
        methods.register("brand_new", items=("sequence",))(lambda batch: None)
    with pytest.raises(ValueError, match="needs='weights'; accepted: attention, gradients, reruns, module"):
        methods.register("brand_new", items=("sequence",), needs=("weights",), summary="s")(lambda batch: None)
    assert "brand_new" not in methods.registry()
    with pytest.raises(ValueError, match="needs differs from the method's first registration"):
        methods.register("raw", items=("streams",), needs=("module",))(lambda batch: None)
    for name in ("random", "target", "y", "not a name"):
        with pytest.raises(ValueError, match="a method name is an identifier other than random, target"):
            methods.register(name, items=("sequence",), needs=("reruns",), summary="s")
    assert not methods.get("raw").supports("streams")


def test_the_method_list_lives_only_in_the_registry():
    """No method name is dispatched or listed outside the registry: dvc.yaml's plots are
    drawn per method from the data, the experiments never branch on a method's name."""
    names = list(methods.registry())
    assert "raw" not in (ROOT / "dvc.yaml").read_text()
    from attnlab import attribution, experiments, workflow
    for module in (attribution, workflow, *(m for m in vars(experiments).values() if inspect.ismodule(m))):
        source = inspect.getsource(module)
        for name in names:
            assert f'== "{name}"' not in source and f"== '{name}'" not in source, (module.__name__, name)


def test_head_fusion_is_one_helper():
    from attnlab.explain.rollout import fuse_heads

    a = torch.rand(2, 3, 4, 4)
    assert torch.equal(fuse_heads(a), a.mean(1))
    assert torch.equal(fuse_heads(a, "max"), a.amax(1))
    assert torch.equal(fuse_heads(a.unsqueeze(1), "min", dim=2), a.amin(1).unsqueeze(1))
    with pytest.raises(ValueError, match="head_fusion must be one of"):
        fuse_heads(a, "median")


def test_one_mask_convention_true_means_a_real_token():
    """mask=True marks real tokens in rollout, readout, HeadStats and VocabAttention alike;
    rollout and readout still take torch's padding_mask (True = padded) as an alias."""
    from attnlab import VocabAttention, readout, rollout
    from attnlab.evaluate import head_diagnostics

    g = torch.Generator().manual_seed(0)
    atts = [torch.rand(2, 2, 5, 5, generator=g).softmax(-1) for _ in range(2)]
    real = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])
    joint = rollout(atts, mask=real)
    assert torch.equal(joint, rollout(atts, padding_mask=~real))
    assert joint[0, 3:].abs().sum() == 0 and joint[0, :, 3:].abs().sum() == 0     # padding carries nothing
    assert torch.equal(readout(joint, "mean", mask=real), readout(joint, "mean", padding_mask=~real))
    torch.testing.assert_close(readout(joint, "mean", mask=real)[0], joint[0, :3].mean(0))
    with pytest.raises(ValueError, match="not both"):
        rollout(atts, mask=real, padding_mask=~real)
    stats = head_diagnostics(atts, mask=real)
    only_real = head_diagnostics([a[1:] for a in atts])                          # sample 1 has no padding
    assert not torch.equal(stats["entropy"], head_diagnostics(atts, mask=~real)["entropy"])
    assert stats["entropy"].shape == only_real["entropy"].shape
    agg = VocabAttention(6).update(torch.tensor([[1, 2, 3, 4, 5], [1, 2, 3, 4, 5]]), atts[0], mask=real)
    assert agg.count[4].sum() == 5 and agg.count[:, 4].sum() == 5                 # token 4: real in sample 1 only
