"""LoRA adapter files exchanged with Hugging Face PEFT (issue 6, "LoRA files written by elra load
in PEFT and give the same outputs").

A small torch model (``layers.0.q_proj`` 7→5, ``layers.0.v_proj`` 5→6, both adapted, and an
unadapted ``head`` 6→3, with ``tanh`` between) is given random seeded weights. elra builds LoRA
adapters for the two projections through the C ABI, with random nonzero A and B and
``lora_alpha = 7 ≠ r = 3`` (so the scaling α/r = 7/3 matters), and saves them as one directory.

- ``test_elra_lora_directory_has_what_peft_loads`` needs neither torch nor PEFT: it checks the
  files against what PEFT's loader does (its key mapping, target matching, config fields and
  types, and its forward formula ``x W0ᵀ + (α/r) (x Aᵀ) Bᵀ``), re-implemented here from PEFT's
  source (``utils/save_and_load.py``, ``tuners/tuners_utils.py``, ``tuners/lora/{config,layer}.py``).
- ``test_peft_loads_elra_lora_files`` loads the directory with ``PeftModel.from_pretrained`` (any
  non-deprecation warning fails), checks that PEFT's ``lora_A``/``lora_B`` equal elra's bit for
  bit, that a second ``load_adapter`` reports no missing and no unexpected keys, and that PEFT's
  outputs (per module and for the whole model) match elra's forward and a NumPy reference.
- ``test_elra_loads_peft_saved_lora_files``: the reverse direction — a LoRA adapter saved by
  ``peft_model.save_pretrained`` loads in elra and gives PEFT's outputs.

The torch tests are skipped (with the reason) where torch or PEFT is not importable; they run on
the device machine, see ``scripts/stage-gpu-peft.sh``.
"""

import dataclasses
import json
import warnings

import numpy as np
import pytest

import elra
from conftest import read_safetensors

R, LORA_ALPHA = 3, 7
SCALING = LORA_ALPHA / R
#: Adapted modules: name → (out, in).
MODULES = {"layers.0.q_proj": (5, 7), "layers.0.v_proj": (6, 5)}
#: Every nn.Linear of the model (PEFT only wraps targeted Linear layers).
LINEARS = ["layers.0.q_proj", "layers.0.v_proj", "head"]
HEAD = (3, 6)
N = 4

#: Relative tolerance of outputs. f64: every path (elra, PEFT, NumPy) is a handful of dot products
#: of length ≤ 7 plus tanh, each off by a few units of u = 1.1e-16 relative to the norms of its
#: terms; random well-scaled data keeps the norm-wise condition number O(1), so 1e-12 leaves three
#: orders of margin. f32 (u = 6.0e-8): the same count gives ~1e-6; 1e-5 leaves a factor 10.
TOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]

#: LoraConfig's fields (with PeftConfig's) in PEFT 0.20 (src/peft/tuners/lora/config.py,
#: src/peft/config.py), used to check the config keys where PEFT cannot be imported; with PEFT
#: importable its own dataclass fields are used.
PEFT_LORA_CONFIG_FIELDS = {
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path",
    "revision", "inference_mode", "r", "target_modules", "exclude_modules", "lora_alpha",
    "lora_dropout", "fan_in_fan_out", "bias", "use_rslora", "modules_to_save",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "rank_pattern", "alpha_pattern",
    "megatron_config", "megatron_core", "trainable_token_indices", "loftq_config", "eva_config",
    "corda_config", "lora_ga_config", "use_dora", "velora_config", "alora_invocation_tokens",
    "use_qalora", "qalora_group_size", "monteclora_config", "layer_replication",
    "runtime_config", "lora_bias", "target_parameters", "use_bdlora", "arrow_config",
    "kasa_config", "ensure_weight_tying",
}


def rel(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def weights(dtype, seed):
    """Seeded W0, A (r×in), B (out×r) per adapted module and the head's weight and bias, all
    rounded to ``dtype`` (the references below use these rounded values in float64)."""
    rng = np.random.default_rng(seed)
    w = {"W0": {}, "A": {}, "B": {}}
    for m, (out, inp) in MODULES.items():
        w["W0"][m] = rng.standard_normal((out, inp)).astype(dtype)
        w["A"][m] = rng.standard_normal((R, inp)).astype(dtype)
        w["B"][m] = rng.standard_normal((out, R)).astype(dtype)
    w["head_w"] = rng.standard_normal(HEAD).astype(dtype)
    w["head_b"] = rng.standard_normal(HEAD[0]).astype(dtype)
    return w


def merged_ref(w, m):
    """W0 + (α/r)·B·A in float64 (LoRA, Hu et al. 2021, §4.1; PEFT ``LoraLayer``)."""
    f = lambda a: np.asarray(a, dtype=np.float64)
    return f(w["W0"][m]) + SCALING * f(w["B"][m]) @ f(w["A"][m])


def model_ref(w, x, linear):
    """The model's forward with ``linear(module, x)`` for the two projections:
    ``head(v_proj(tanh(q_proj(x))))``."""
    h = np.tanh(linear("layers.0.q_proj", x))
    v = linear("layers.0.v_proj", h)
    return v @ np.asarray(w["head_w"], np.float64).T + np.asarray(w["head_b"], np.float64)


def elra_adapters(w, dtype):
    ads = {}
    for m in MODULES:
        ad = elra.Adapter(w["W0"][m], "lora", r=R, dtype=dtype, lora_alpha=float(LORA_ALPHA))
        ad.set("A", w["A"][m])
        ad.set("B", w["B"][m])
        ads[m] = ad
    return ads


def peft_target_matches(module, target_modules):
    """PEFT's ``check_target_module_exists`` for a list: exact name or dotted suffix."""
    return module in target_modules or any(module.endswith("." + t) for t in target_modules)


def peft_checkpoint_key(model_key, adapter_name="default"):
    """PEFT's ``_remove_adapter_name_from_state_dict_key``: the checkpoint key of a model key,
    e.g. ``…q_proj.lora_A.default.weight`` → ``…q_proj.lora_A.weight``."""
    key, _, suffix = model_key.rpartition(".")
    key = key.removesuffix("." + adapter_name)
    return f"{key}.{suffix}"


@pytest.mark.parametrize("dtype", DTYPES)
def test_elra_lora_directory_has_what_peft_loads(tmp_path, dtype):
    w = weights(dtype, 2024)
    ads = elra_adapters(w, dtype)
    elra.save(tmp_path, ads)

    # Tensors: exactly the keys PEFT's loader maps onto the adapter parameters it creates.
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    targeted = [m for m in LINEARS if peft_target_matches(m, cfg["target_modules"])]
    assert targeted == list(MODULES), "PEFT would wrap exactly the adapted modules (not `head`)"
    model_keys = [f"base_model.model.{m}.lora_{p}.default.weight" for m in targeted for p in "AB"]
    expected = {peft_checkpoint_key(k) for k in model_keys}
    tensors, meta = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == expected, "no missing and no unexpected keys"
    assert meta == {"format": "pt"}
    for m, (out, inp) in MODULES.items():
        a = tensors[f"base_model.model.{m}.lora_A.weight"]
        b = tensors[f"base_model.model.{m}.lora_B.weight"]
        assert a.shape == (R, inp) and b.shape == (out, R), "lora_A r×in, lora_B out×r"
        assert a.dtype == np.dtype(dtype) and b.dtype == a.dtype, "the adapters' dtype"
        np.testing.assert_array_equal(a, w["A"][m])
        np.testing.assert_array_equal(b, w["B"][m])

    # Config: the fields the issue names, all known to LoraConfig, with the types PEFT expects.
    try:
        import peft

        known = {f.name for f in dataclasses.fields(peft.LoraConfig)}
    except ImportError:
        known = PEFT_LORA_CONFIG_FIELDS
    assert set(cfg) <= known, f"fields LoraConfig does not know: {set(cfg) - known}"
    for k in ["peft_type", "r", "lora_alpha", "target_modules", "lora_dropout", "bias",
              "fan_in_fan_out", "task_type", "base_model_name_or_path"]:
        assert k in cfg, k
    assert cfg["peft_type"] == "LORA"
    assert type(cfg["r"]) is int and cfg["r"] == R
    assert type(cfg["lora_alpha"]) is int and cfg["lora_alpha"] == LORA_ALPHA  # LoraConfig: int
    assert all(type(t) is str for t in cfg["target_modules"])
    assert sorted(cfg["target_modules"]) == sorted(MODULES)
    assert type(cfg["lora_dropout"]) in (int, float) and cfg["lora_dropout"] == 0
    assert cfg["bias"] == "none"
    assert cfg["fan_in_fan_out"] is False
    assert cfg["use_rslora"] is False and cfg["use_dora"] is False
    assert cfg["rank_pattern"] == {} and cfg["alpha_pattern"] == {}
    assert cfg["modules_to_save"] is None
    # A base_model_name_or_path would make PEFT's save look the model up on the Hub.
    assert cfg["task_type"] is None and cfg["base_model_name_or_path"] is None

    # PEFT's LoRA Linear forward, base(x) + scaling·lora_B(lora_A(x)) with scaling = lora_alpha/r
    # from the file, against elra's forward of each module and of the whole model.
    rng = np.random.default_rng(5)
    s = cfg["lora_alpha"] / cfg["r"]
    f = lambda a: np.asarray(a, dtype=np.float64)
    peft_linear = lambda m, x: (x @ f(w["W0"][m]).T
                                + s * (x @ f(tensors[f"base_model.model.{m}.lora_A.weight"]).T)
                                @ f(tensors[f"base_model.model.{m}.lora_B.weight"]).T)
    x = f(rng.standard_normal((N, MODULES["layers.0.q_proj"][1])).astype(dtype))
    y_peft = model_ref(w, x, peft_linear)
    y_elra = model_ref(w, x, lambda m, x: f(ads[m].forward(x.astype(dtype))))
    y_ref = model_ref(w, x, lambda m, x: x @ merged_ref(w, m).T)
    assert rel(y_peft, y_ref) < TOL[dtype]
    assert rel(y_elra, y_ref) < TOL[dtype]
    # The adapters matter: the output moves by O(1) relative to the base model's.
    assert rel(model_ref(w, x, lambda m, x: x @ f(w["W0"][m]).T), y_ref) > 0.1


def torch_and_peft():
    """``(torch, peft)`` or a skip naming what is missing."""
    try:
        import torch
    except ImportError as e:
        pytest.skip(f"torch is not importable ({e}); the PEFT check runs where torch and peft are "
                    "installed: scripts/stage-gpu-peft.sh")
    try:
        import peft
    except ImportError as e:
        pytest.skip(f"peft is not importable ({e}); see scripts/stage-gpu-peft.sh")
    return torch, peft


def torch_model(torch, w, dtype):
    """The base model with ``w``'s weights: ``head(v_proj(tanh(q_proj(x))))``, no bias on the
    adapted projections (elra's layer is ``Y = X W_newᵀ``)."""
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(7, 5, bias=False)
            self.v_proj = nn.Linear(5, 6, bias=False)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Block()])
            self.head = nn.Linear(6, 3)

        def forward(self, x):
            b = self.layers[0]
            return self.head(b.v_proj(torch.tanh(b.q_proj(x))))

    torch.manual_seed(0)
    net = Net().to({np.float64: torch.float64, np.float32: torch.float32}[dtype])
    with torch.no_grad():
        for m in MODULES:
            net.get_submodule(m).weight.copy_(torch.from_numpy(w["W0"][m]))
        net.head.weight.copy_(torch.from_numpy(w["head_w"]))
        net.head.bias.copy_(torch.from_numpy(w["head_b"]))
    return net.eval()


def lora_modules(peft_model):
    """Names (relative to the base model) of the modules PEFT wrapped with LoRA."""
    from peft.tuners.lora import LoraLayer

    inner = peft_model.base_model.model
    return sorted(n for n, mod in inner.named_modules() if isinstance(mod, LoraLayer))


def t2n(t):
    return t.detach().cpu().numpy()


def not_deprecations(caught):
    """Warnings other than deprecation notices (which concern library APIs, not our files), and
    any warning at all that speaks of keys."""
    return [f"{w.category.__name__}: {w.message}" for w in caught
            if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning,
                                           FutureWarning))
            or "key" in str(w.message).lower()]


@pytest.mark.parametrize("dtype", DTYPES)
def test_peft_loads_elra_lora_files(tmp_path, dtype):
    torch, peft = torch_and_peft()
    w = weights(dtype, 2024)
    ads = elra_adapters(w, dtype)
    elra.save(tmp_path, ads)

    base = torch_model(torch, w, dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(base, str(tmp_path))
    assert not not_deprecations(caught), not_deprecations(caught)
    pm.eval()
    pm.to("cpu")

    assert lora_modules(pm) == sorted(MODULES), "PEFT wraps exactly the adapted modules"
    pc = pm.peft_config["default"]
    assert pc.r == R and pc.lora_alpha == LORA_ALPHA and set(pc.target_modules) == set(MODULES)
    inner = pm.base_model.model
    for m in MODULES:
        layer = inner.get_submodule(m)
        a, b = t2n(layer.lora_A["default"].weight), t2n(layer.lora_B["default"].weight)
        assert a.dtype == dtype and b.dtype == dtype, "PEFT keeps the base layer's dtype"
        np.testing.assert_array_equal(a, w["A"][m])  # bit for bit
        np.testing.assert_array_equal(b, w["B"][m])
        assert layer.scaling["default"] == SCALING  # lora_alpha / r, computed alike

    # A second load of the same directory reports its keys: none missing, none unexpected.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = pm.load_adapter(str(tmp_path), adapter_name="again")
    assert not not_deprecations(caught), not_deprecations(caught)
    assert list(res.missing_keys) == [] and list(res.unexpected_keys) == [], res
    for m in MODULES:
        layer = inner.get_submodule(m)
        np.testing.assert_array_equal(t2n(layer.lora_A["again"].weight), w["A"][m])
        np.testing.assert_array_equal(t2n(layer.lora_B["again"].weight), w["B"][m])
    pm.set_adapter("default")
    pm.eval()

    rng = np.random.default_rng(6)
    f = lambda a: np.asarray(a, dtype=np.float64)
    tol = TOL[dtype]
    with torch.no_grad():
        for m, (out, inp) in MODULES.items():
            x = rng.standard_normal((N, inp)).astype(dtype)
            y_peft = f(t2n(inner.get_submodule(m)(torch.from_numpy(x))))
            y_ref = f(x) @ merged_ref(w, m).T
            assert rel(y_peft, y_ref) < tol, m
            assert rel(ads[m].forward(x), y_ref) < tol, m
            assert rel(ads[m].forward(x), y_peft) < 2 * tol, m
        x = rng.standard_normal((N, MODULES["layers.0.q_proj"][1])).astype(dtype)
        y_peft = f(t2n(pm(torch.from_numpy(x))))
        with pm.disable_adapter():
            y_base = f(t2n(pm(torch.from_numpy(x))))
    y_ref = model_ref(w, f(x), lambda m, x: x @ merged_ref(w, m).T)
    y_elra = model_ref(w, f(x), lambda m, x: f(ads[m].forward(x.astype(dtype))))
    assert rel(y_peft, y_ref) < tol
    assert rel(y_elra, y_ref) < tol
    assert rel(y_peft, y_elra) < 2 * tol
    # Without the adapters PEFT gives the base model, which differs by O(1): the check has teeth.
    assert rel(y_base, model_ref(w, f(x), lambda m, x: x @ f(w["W0"][m]).T)) < tol
    assert rel(y_base, y_ref) > 0.1


@pytest.mark.parametrize("dtype", DTYPES)
def test_elra_loads_peft_saved_lora_files(tmp_path, dtype):
    torch, peft = torch_and_peft()
    w = weights(dtype, 77)
    base = torch_model(torch, w, dtype)
    config = peft.LoraConfig(r=R, lora_alpha=LORA_ALPHA, target_modules=["q_proj", "v_proj"],
                             lora_dropout=0.0, bias="none")
    pm = peft.get_peft_model(base, config)
    inner = pm.base_model.model
    with torch.no_grad():
        for m in MODULES:
            layer = inner.get_submodule(m)
            layer.lora_A["default"].weight.copy_(torch.from_numpy(w["A"][m]))
            layer.lora_B["default"].weight.copy_(torch.from_numpy(w["B"][m]))
    pm.eval()
    pm.save_pretrained(str(tmp_path))

    # PEFT's own file: the key names and shapes elra writes (this pins the naming assumption).
    tensors, _ = read_safetensors(tmp_path / "adapter_model.safetensors")
    assert set(tensors) == {f"base_model.model.{m}.lora_{p}.weight" for m in MODULES for p in "AB"}
    cfg = json.load(open(tmp_path / "adapter_config.json"))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == R and cfg["lora_alpha"] == LORA_ALPHA

    rng = np.random.default_rng(8)
    f = lambda a: np.asarray(a, dtype=np.float64)
    tol = TOL[dtype]
    loaded = {}
    for m, (out, inp) in MODULES.items():
        ad = elra.Adapter.load(tmp_path, m, w["W0"][m], dtype=dtype)
        assert ad.variant == "lora" and ad.r == R
        np.testing.assert_array_equal(ad.get("A"), w["A"][m])
        np.testing.assert_array_equal(ad.get("B"), w["B"][m])
        assert rel(ad.merge(), merged_ref(w, m)) < tol
        x = rng.standard_normal((N, inp)).astype(dtype)
        with torch.no_grad():
            y_peft = f(t2n(inner.get_submodule(m)(torch.from_numpy(x))))
        assert rel(ad.forward(x), y_peft) < 2 * tol, m
        assert rel(y_peft, f(x) @ merged_ref(w, m).T) < tol, m
        loaded[m] = ad

    # And back: elra saves what it loaded; PEFT loads it onto a fresh base with equal outputs.
    out_dir = tmp_path / "from_elra"
    elra.save(out_dir, loaded)
    pm2 = peft.PeftModel.from_pretrained(torch_model(torch, w, dtype), str(out_dir))
    pm2.eval()
    x = rng.standard_normal((N, MODULES["layers.0.q_proj"][1])).astype(dtype)
    with torch.no_grad():
        y1 = t2n(pm(torch.from_numpy(x)))
        y2 = t2n(pm2.to("cpu")(torch.from_numpy(x)))
    np.testing.assert_array_equal(y1, y2)
