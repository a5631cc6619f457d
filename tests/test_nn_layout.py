"""The layout of lowrankopt.nn: rooms by family, every name of 0.1 still importable from lowrankopt.nn, the 0.1 module
paths as deprecated forwarding modules (code and whole-model pickles that name them keep working), and no private
helper imported sideways between the families."""

import ast
import importlib
import io
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from torch import nn

import lowrankopt.nn as lnn

ROOT = Path(__file__).resolve().parents[1]
NN = ROOT / "lowrankopt" / "nn"
D = torch.float64

# lowrankopt.nn.__all__ of lowrankopt 0.1
NAMES_01 = [
    "TBasis", "TBasisConv2d", "TBasisFactory", "TBasisLinear", "Tensorization", "tbasis_convert",
    "tbasis_parameter_count", "tbasis_penalty", "GSMatrix", "GSOrthogonalConv2d", "GSOFTConfig", "GSOFTLinear",
    "GSOrthogonal", "LipConvNet", "LowRankLinear", "MaxMinPermuted", "STTPConv2d", "SkewOrthogonalConv2d", "STTPLinear",
    "SVDPConv2d", "SVDPLinear", "TTConv2d", "TTLinear", "certified_accuracy", "certified_radius", "channel_shuffle",
    "count_parameters", "disable_adapters", "dopt_penalty", "gs_matmul", "gs_project", "gsoft_state_dict",
    "inject_gsoft", "load_gsoft_state_dict", "merge_adapter", "merge_and_unload", "sttp_convert", "sttp_to_dense",
    "tt_conv_convert", "tt_conv_orthogonalize_", "tt_conv_penalty", "unmerge_adapter",
]  # fmt: skip

# the 0.1 modules: (their __all__, where they live now)
OLD_MODULES = {
    "lowrank": (["LowRankLinear", "TTLinear"], "manifold.lowrank"),
    "householder": (["householder_numel", "householder_orthonormal", "householder_params"], "orthogonal.householder"),
    "gs": (
        ["GSMatrix", "GSOrthogonal", "blockdiag_matmul", "gs_matmul", "gs_project", "shuffle_index"], "orthogonal.gs"
    ),
    "gs_conv": (
        ["GSOrthogonalConv2d", "LipConvNet", "MaxMinPermuted", "SkewOrthogonalConv2d", "certified_accuracy",
         "certified_radius", "channel_shuffle"],
        "orthogonal.gs_conv",
    ),
    "gsoft": (
        ["GSOFTConfig", "GSOFTLinear", "disable_adapters", "gsoft_state_dict", "inject_gsoft", "load_gsoft_state_dict",
         "merge_adapter", "merge_and_unload", "unmerge_adapter"],
        "orthogonal.gsoft",
    ),
    "sttp": (
        ["OrthonormalTT", "STTPConv2d", "STTPLinear", "SVDPConv2d", "SVDPLinear", "count_parameters", "dopt_penalty",
         "sttp_convert", "sttp_to_dense"],
        "spectral.sttp",
    ),
    "tt_conv": (["TTConv2d", "tt_conv_convert", "tt_conv_orthogonalize_", "tt_conv_penalty"], "spectral.tt_conv"),
    "tbasis": (
        ["TBasis", "TBasisFactory", "TBasisLinear", "TBasisConv2d", "Tensorization", "tbasis_convert", "tbasis_penalty",
         "tbasis_parameter_count"],
        "compression.tbasis",
    ),
}  # fmt: skip

ROOMS = ("manifold", "orthogonal", "spectral", "compression")


def test_every_name_of_0_1_and_of_the_rooms_is_in_lowrankopt_nn():
    assert set(NAMES_01) <= set(lnn.__all__)
    for name in lnn.__all__:
        assert getattr(lnn, name) is not None
    for room in ROOMS:
        module = importlib.import_module(f"lowrankopt.nn.{room}")
        for name in module.__all__:  # one object, whichever path it is imported from
            assert getattr(lnn, name) is getattr(module, name), (room, name)
    assert {m.split(".")[0] for _, m in OLD_MODULES.values()} == set(ROOMS)


def _import_fresh(path):
    sys.modules.pop(path, None)
    return importlib.import_module(path)


@pytest.mark.parametrize("old", list(OLD_MODULES))
def test_the_0_1_module_paths_warn_and_forward_every_name(old):
    names, home = OLD_MODULES[old]
    with pytest.warns(DeprecationWarning, match=f"lowrankopt.nn.{old} is deprecated.*lowrankopt.nn.{home}"):
        module = _import_fresh(f"lowrankopt.nn.{old}")
    new = importlib.import_module(f"lowrankopt.nn.{home}")
    assert module.__all__ == names
    for name in names:  # the same objects as lowrankopt.nn's (classes keep their identity: isinstance works)
        assert getattr(module, name) is getattr(lnn, name, None) or getattr(module, name) is getattr(new, name)
    private = [n for n in vars(new) if n.startswith("_") and not n.startswith("__")]
    assert private and all(getattr(module, n) is getattr(new, n) for n in private)  # private names too (pickles)
    namespace = {}
    exec(f"from lowrankopt.nn.{old} import *", namespace)
    assert set(names) <= set(namespace)
    with pytest.raises(AttributeError, match=f"lowrankopt.nn.{old}"):
        module.no_such_name  # noqa: B018


def test_importing_lowrankopt_nn_imports_no_deprecated_path():
    code = (
        "import sys, lowrankopt.nn, lowrankopt.nn.manifold, lowrankopt.nn.orthogonal, lowrankopt.nn.spectral, "
        "lowrankopt.nn.compression\n"
        f"old = [m for m in {sorted(OLD_MODULES)!r} if 'lowrankopt.nn.' + m in sys.modules]\n"
        "assert not old, old"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr


def _save_with_old_paths(obj, renames):
    """``torch.save(obj)`` with the class paths of ``renames`` (new module -> 0.1 module) written as lowrankopt 0.1
    wrote them (pickle protocol 2: GLOBAL opcodes ``c<module>\\n<name>\\n``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    src, out = zipfile.ZipFile(io.BytesIO(buf.getvalue())), io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                for new, old in renames.items():
                    assert f"c{new}\n".encode() in data
                    data = data.replace(f"c{new}\n".encode(), f"c{old}\n".encode())
                assert b"lowrankopt.nn.spectral" not in data and b"lowrankopt.nn.orthogonal" not in data
                assert b"lowrankopt.nn.compression" not in data
            dst.writestr(info, data)
    return out.getvalue()


def test_a_model_pickled_with_the_0_1_class_paths_still_loads():
    torch.manual_seed(0)
    model = nn.Sequential(
        lnn.STTPConv2d(2, 4, 3, padding=1, rank=3, dtype=D), nn.Tanh(), nn.Flatten(), nn.Linear(64, 8), nn.Linear(8, 8)
    ).double()
    lnn.convert_to_sttp(model, 2, target_modules=["3"])
    lnn.convert_to_gsoft(model, lnn.GSOFTConfig(block_size=2, target_modules=["4"]))
    with torch.no_grad():
        model[4].gsoft_in.L.normal_()  # not the identity
    tb = nn.Sequential(nn.Linear(8, 4)).double()
    lnn.convert_to_tbasis(tb, 3, 2, generator=torch.Generator().manual_seed(1))
    lip = lnn.LipConvNet(1, 3, 8, width=4, depth=1, stages=1, dtype=D)  # holds the private _OrthonormalRowsLinear
    x, y = torch.randn(2, 2, 4, 4, dtype=D), torch.randn(2, 1, 8, 8, dtype=D)
    ref = (tb(model(x)), lip(y))
    renames = {
        "lowrankopt.nn.spectral.sttp_layers": "lowrankopt.nn.sttp",  # 0.1 defined the STTP layers in sttp
        "lowrankopt.nn.orthogonal.orthonormal_tt": "lowrankopt.nn.sttp",  # 0.1 defined OrthonormalTT in sttp
        "lowrankopt.nn.orthogonal.gsoft_layer": "lowrankopt.nn.gsoft",  # 0.1 defined GSOFTLinear in gsoft
        "lowrankopt.nn.orthogonal.gs": "lowrankopt.nn.gs",
        "lowrankopt.nn.orthogonal.gs_conv": "lowrankopt.nn.gs_conv",
        "lowrankopt.nn.compression.tbasis": "lowrankopt.nn.tbasis",
    }
    blob = _save_with_old_paths({"model": model, "tb": tb, "lip": lip}, renames)
    for old in renames.values():
        sys.modules.pop(old, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the old paths warn when the pickle imports them
        loaded = torch.load(io.BytesIO(blob), weights_only=False)
    assert type(loaded["model"][0]) is lnn.STTPConv2d and type(loaded["model"][3]) is lnn.STTPLinear
    assert type(loaded["model"][4]) is lnn.GSOFTLinear
    assert type(loaded["tb"][0]) is lnn.TBasisLinear and type(loaded["lip"]) is lnn.LipConvNet
    assert torch.equal(loaded["tb"](loaded["model"](x)), ref[0]) and torch.equal(loaded["lip"](y), ref[1])


def _imports(path):
    """``(module imported from, name)`` for every ``from X import name`` of the file, X resolved to a dotted path."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, *([node.module] if node.module else [])])
            for alias in node.names:
                yield source, alias.name


def test_no_private_name_is_imported_sideways():
    """Within lowrankopt.nn a private name comes only from nn/_common.py (the shared helpers); outside nn nothing
    imports a private name of nn."""
    for path in sorted((ROOT / "lowrankopt").rglob("*.py")):
        inside = NN in path.parents
        for source, name in _imports(path):
            if not name.startswith("_") or name.startswith("__") or not source.startswith("lowrankopt.nn"):
                continue
            assert inside and source == "lowrankopt.nn._common", f"{path.relative_to(ROOT)}: {name} from {source}"
    # the layer modules live in the rooms; at the top only the package, the shared modules and the 0.1 paths
    top = {p.stem for p in NN.glob("*.py")}
    assert top == {"__init__", "_common", "_deprecated", "surgery", *OLD_MODULES}
    for old in OLD_MODULES:
        assert "_forward_module(" in (NN / f"{old}.py").read_text()
