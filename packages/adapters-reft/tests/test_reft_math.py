"""ReFT math, positions and padding, checked against hand computations."""

from __future__ import annotations

import pytest
import torch

import adapters
from adapters import DiReftConfig, LoReftConfig, NoReftConfig, ReftConfig
from adapters.testing import tiny_model
from adapters_reft.layer import orthonormal_rows


def _model(task: str = "base"):
    model = tiny_model("qwen3", task)
    adapters.init(model)
    return model


def _position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


CONFIGS = [
    LoReftConfig(layers=[0], prefix_positions=2, suffix_positions=2, r=3, dropout=0.0),
    NoReftConfig(layers=[0], prefix_positions=2, suffix_positions=2, r=3, dropout=0.0),
    DiReftConfig(layers=[0], prefix_positions=2, suffix_positions=2, r=3, dropout=0.0, non_linearity="gelu"),
    ReftConfig(layers=[0], prefix_positions=2, suffix_positions=2, r=2, dropout=0.0, tied_weights=True,
               non_linearity="tanh"),
]


@pytest.mark.parametrize("config", CONFIGS, ids=["loreft", "noreft", "direft", "tied"])
def test_formula_matches_hand_computation(config, helpers):
    model = _model()
    ids = torch.arange(4, 12).reshape(1, 8).repeat(2, 1)
    ids[1] = torch.arange(20, 28)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0], [1] * 8])  # row 0: 5 real tokens (right padding)
    model.add_adapter("a", config=config)
    seen, handle = helpers.capture(model, 0)  # runs after the ReFT hook
    model(input_ids=ids, attention_mask=mask)
    base = seen.pop().double()
    model.set_active_adapters("a")
    model(input_ids=ids, attention_mask=mask)
    got = seen.pop().double()
    handle.remove()

    unit = model.get_adapter("a")["layers.0.reft"]
    act = {None: lambda t: t, "gelu": torch.nn.functional.gelu, "tanh": torch.tanh}[config.non_linearity]

    def phi(h, iv):
        w = iv.rotate_weight.detach().double()
        r_mat = helpers.rotation(w) if config.orthogonality else w
        edit = act(h @ iv.learned_source.weight.detach().double().t() + iv.learned_source.bias.detach().double())
        if config.subtract_projection:
            edit = edit - h @ r_mat.t()
        return h + edit @ r_mat

    expected = base.clone()
    positions = {0: ([0, 1], [3, 4]), 1: ([0, 1], [6, 7])}
    for row, (pre, suf) in positions.items():
        for p in pre:
            iv = unit.interventions["shared" if config.tied_weights else "prefix"]
            expected[row, p] = phi(base[row, p], iv)
        for p in suf:
            iv = unit.interventions["shared" if config.tied_weights else "suffix"]
            expected[row, p] = phi(base[row, p], iv)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    untouched = [(0, 2), (0, 5), (0, 6), (0, 7), (1, 2), (1, 5)]  # middle tokens and padding
    for row, p in untouched:
        assert torch.equal(got[row, p], base[row, p])
    assert (got - base).abs().max() > 1e-3


def test_overlapping_positions_tied_once_untied_both(helpers):
    ids = torch.arange(4, 7).reshape(1, 3)
    mask = torch.ones(1, 3, dtype=torch.long)
    for tied in (True, False):
        model = _model()
        cfg = ReftConfig(layers=[0], prefix_positions=2, suffix_positions=2, r=1, dropout=0.0, tied_weights=tied)
        model.add_adapter("a", config=cfg)
        seen, handle = helpers.capture(model, 0)
        model(input_ids=ids, attention_mask=mask)
        base = seen.pop()
        model.set_active_adapters("a")
        model(input_ids=ids, attention_mask=mask)
        got = seen.pop()
        handle.remove()
        unit = model.get_adapter("a")["layers.0.reft"]
        with torch.no_grad():
            if tied:
                iv = unit.interventions["shared"]
                expected = base + iv.delta(base)  # every token edited exactly once
            else:
                pre, suf = unit.interventions["prefix"], unit.interventions["suffix"]
                expected = base.clone()
                expected[:, :2] += pre.delta(base[:, :2])
                expected[:, 1:] += suf.delta(base[:, 1:])  # token 1 is in both: both edits
        torch.testing.assert_close(got, expected)


def test_orthonormal_rows_match_qr_and_stay_orthonormal_while_training():
    torch.manual_seed(1)
    a = torch.randn(4, 32)
    from_gs = orthonormal_rows(a).double()
    q, r = torch.linalg.qr(a.double().t())
    torch.testing.assert_close(from_gs, (q * torch.sign(torch.diagonal(r))).t(), atol=1e-5, rtol=0)

    model = _model("causal_lm")
    model.add_adapter("a", config=LoReftConfig(r=4, suffix_positions=2))
    model.train_adapter("a")
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.05)
    ids = torch.randint(4, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    before = {k: v.detach().clone() for k, v in model.named_parameters() if "rotate_weight" in k}
    for _ in range(5):
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    moved = 0
    for name, module in model.named_modules():
        if name.endswith("interventions.prefix") or name.endswith("interventions.suffix"):
            rot = module.rotation().detach().double()
            torch.testing.assert_close(rot @ rot.t(), torch.eye(4, dtype=torch.float64), atol=1e-6, rtol=0)
            moved += int(not torch.equal(module.rotate_weight.detach(), before[name + ".rotate_weight"]))
    assert moved == 4  # 2 layers x (prefix, suffix): every free rotation parameter was trained


@pytest.mark.parametrize("tied", [False, True])
def test_left_and_right_padding_and_ragged_batches(tied, helpers):
    """Each row of a padded batch (left or right padding) equals that row run alone, unpadded."""
    model = _model()
    cfg = ReftConfig(layers="all", prefix_positions=3, suffix_positions=2, r=2, dropout=0.0, tied_weights=tied)
    model.add_adapter("a", config=cfg, set_active=True)
    lengths = [5, 8, 2]
    gen = torch.Generator().manual_seed(3)
    rows = [torch.randint(4, 128, (n,), generator=gen) for n in lengths]
    alone = []
    for row in rows:
        ids = row.unsqueeze(0)
        alone.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0])
    seen, handle = helpers.capture(model, 0)
    for side in ("left", "right"):
        ids = torch.zeros(3, 8, dtype=torch.long)
        mask = torch.zeros(3, 8, dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(8 - len(row), 8) if side == "left" else slice(0, len(row))
            ids[i, span] = row
            mask[i, span] = 1
        out = model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask)).last_hidden_state
        layer0 = seen.pop()
        model.set_active_adapters(None)
        model(input_ids=ids, attention_mask=mask, position_ids=_position_ids(mask))
        base0 = seen.pop()
        model.set_active_adapters("a")
        for i, row in enumerate(rows):
            span = slice(8 - len(row), 8) if side == "left" else slice(0, len(row))
            torch.testing.assert_close(out[i, span], alone[i], atol=1e-5, rtol=1e-5)
            pad = mask[i] == 0
            assert torch.equal(layer0[i][pad], base0[i][pad])  # padding never edited
    handle.remove()


def test_prompt_lengths_limits_positions(helpers):
    """Inside prompt_lengths(n), positions are counted in the first n real tokens only."""
    from adapters_reft import prompt_lengths

    model = _model()
    cfg = ReftConfig(layers=[0], prefix_positions=1, suffix_positions=2, r=1, dropout=0.0)
    model.add_adapter("a", config=cfg, set_active=True)
    ids = torch.arange(4, 12).reshape(1, 8)
    seen, handle = helpers.capture(model, 0)
    model(input_ids=ids[:, :5], attention_mask=torch.ones(1, 5, dtype=torch.long))
    short = seen.pop()
    with prompt_lengths([5]):
        model(input_ids=ids, attention_mask=torch.ones(1, 8, dtype=torch.long))
    full = seen.pop()
    model.set_active_adapters(None)
    model(input_ids=ids, attention_mask=torch.ones(1, 8, dtype=torch.long))
    base = seen.pop()
    handle.remove()
    torch.testing.assert_close(full[:, :5], short)  # causal: same prefix, same edits
    assert torch.equal(full[:, 5:], base[:, 5:])  # continuation not edited


@pytest.mark.parametrize("rank", [2, 4, 16])
def test_orthonormal_rows_hold_on_ill_conditioned_and_zero_rows(rank):
    """Nearly dependent rows still give Q of the QR decomposition (not a sign-flipped or NaN row: what Cholesky
    QR gave from a condition number of about 7e3), a zero row leaves every output finite, and the function
    traces on the meta device (shape-only model builds)."""
    gen = torch.Generator().manual_seed(rank)
    a = torch.randn(rank, 256, generator=gen, dtype=torch.float64)
    a[1] = a[0] + 1e-5 * torch.randn(256, generator=gen, dtype=torch.float64)  # condition number ~1e5
    q, r = torch.linalg.qr(a.t())
    want = (q * torch.sign(torch.diagonal(r))).t()
    got = orthonormal_rows(a.float()).double()
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got @ got.t(), torch.eye(rank, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(got, want, atol=2e-2, rtol=0)  # float32 on a 1e5-conditioned input
    assert ((got * want).sum(dim=1) > 0.99).all()  # every row points the reference's way
    zero = a.float().clone()
    zero[rank - 1] = 0
    out = orthonormal_rows(zero.requires_grad_())
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(zero.grad).all()
    with torch.device("meta"):
        assert orthonormal_rows(torch.empty(rank, 256)).shape == (rank, 256)
