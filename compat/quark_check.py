"""Byte comparison of our Quark-format quantization with amd-quark 0.13's file-to-file output.

Run with the Quark venv's python (see compat/quark_setup.sh); our side runs in the project's
venv (``.venv``) through the Python API, ``convert_checkpoint(src, dst, quantize_quark.build(S, [], []))``:

    bash compat/quark_setup.sh && .venv-quark/bin/python compat/quark_check.py

It writes a tiny checkpoint (bf16, fp16 and fp32 copies) (two shards: attention, dense MLP, a MoE layer with a router,
norms, embeddings, lm_head; edge rows: all zero, tiny, huge, exact ties), quantizes it with
Quark's ``quantize_model_per_safetensor`` on CPU for every scheme and with ours, and compares
every tensor byte for byte (``torch.equal`` of the bytes, so NaN codes compare too; dtype and shape
included), the tensor names per file, the
index's weight map, and config.json with its ``quantization_config``. Exit 0 only when all are equal.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch
from safetensors.torch import load_file, save_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMES = ("fp8", "ptpc_fp8", "mxfp4", "int4_wo_128", "int4_fp8")
# Quark globs equal to our default not-quantized set on this model (embeddings and norms are
# never Quark candidates; lm_head and routers are excluded by these)
QUARK_EXCLUDE = ["lm_head", "*.mlp.gate"]
H, FFN, E, V = 256, 384, 4, 512


DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def make_model(path: str, seed: int = 0, dtype: str = "bfloat16") -> None:
    g = torch.Generator().manual_seed(seed)
    dt = DTYPES[dtype]

    def w(*shape, scale=0.05):
        return (torch.randn(*shape, generator=g) * scale).to(dt)

    shard1 = {"model.embed_tokens.weight": w(V, H)}
    shard2 = {"lm_head.weight": w(V, H), "model.norm.weight": torch.ones(H, dtype=dt)}
    for layer, shard in ((0, shard1), (1, shard2)):
        p = f"model.layers.{layer}"
        shard[f"{p}.input_layernorm.weight"] = w(H) + 1
        shard[f"{p}.post_attention_layernorm.weight"] = w(H) + 1
        for proj, shape in (("q_proj", (H, H)), ("k_proj", (H // 2, H)), ("v_proj", (H // 2, H)), ("o_proj", (H, H))):
            shard[f"{p}.self_attn.{proj}.weight"] = w(*shape)
        if layer == 0:
            for proj, shape in (("gate_proj", (FFN, H)), ("up_proj", (FFN, H)), ("down_proj", (H, FFN))):
                shard[f"{p}.mlp.{proj}.weight"] = w(*shape)
        else:
            shard[f"{p}.mlp.gate.weight"] = w(E, H)
            for e in range(E):
                for proj, shape in (("gate_proj", (128, H)), ("up_proj", (128, H)), ("down_proj", (H, 128))):
                    shard[f"{p}.mlp.experts.{e}.{proj}.weight"] = w(*shape)
    q = shard1["model.layers.0.self_attn.q_proj.weight"]
    q[0] = 0  # all-zero row / groups
    q[1, :128] = 0
    q[2] = q[2] * 1e-6  # tiny
    q[3] = q[3] * 300  # large
    q[4] = torch.arange(H, dtype=dt).remainder(16) - 8  # exact halves after scaling
    q[5, :32] = torch.tensor([6.0, 0.25, -0.75, 1.25, 3.5, -5.0, 0.5, 2.5] * 4)  # fp4 ties
    shard1["model.layers.0.self_attn.k_proj.weight"][7] = torch.tensor([7.5, -7.5, 1.0, 3.75] * (H // 4))
    os.makedirs(path, exist_ok=True)
    files = {"model-00001-of-00002.safetensors": shard1, "model-00002-of-00002.safetensors": shard2}
    weight_map = {}
    for fname, tensors in files.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, fname))
        weight_map.update({k: fname for k in tensors})
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
              "intermediate_size": FFN, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "vocab_size": V, "rms_norm_eps": 1e-6, "torch_dtype": dtype, "tie_word_embeddings": False}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


def cases(schemes: list[str]) -> list[tuple[str, str, list[str], list[str]]]:
    """(scheme, case label, Quark's extra exclude globs, our ignore patterns): each scheme as is,
    then one with more modules left out, so that the resolved ``exclude`` lists are compared."""
    out = [(s, "", [], []) for s in schemes]
    if "ptpc_fp8" in schemes:
        out.append(("ptpc_fp8", "+ignore", ["*down_proj", "model.layers.1.self_attn.o_proj"],
                    [r"re:.*down_proj$", "model.layers.1.self_attn.o_proj"]))
    return out


def run_quark(src: str, dst: str, scheme: str, exclude: list[str]) -> None:
    from quark.torch.quantization.config.config import QConfig
    from quark.torch.quantization.config.template import QuantizationSchemeCollection
    from quark.torch.quantization.file2file_quantization import quantize_model_per_safetensor

    layer = QuantizationSchemeCollection().get_scheme(scheme).config
    config = QConfig(global_quant_config=layer, exclude=list(QUARK_EXCLUDE) + exclude)
    quantize_model_per_safetensor(src, config, dst, device="cpu")


def run_ours(src: str, dst: str, scheme: str, ignore: list[str], python: str) -> None:
    """Our converter through the project's Python API (``convert_checkpoint`` with the objects of
    ``quantize_quark.build``), in the project's venv."""
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "tools"))
    code = ("import sys; from convert_checkpoint import convert_checkpoint; "
            "from convert_checkpoint.converters.quantize_quark import build; "
            "convert_checkpoint(sys.argv[1], sys.argv[2], build(sys.argv[3], [], sys.argv[4:]), progress=False)")
    done = subprocess.run([python, "-c", code, src, dst, scheme, *ignore], env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"our converter failed on {scheme}:\n{done.stderr}")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def compare(ref: str, ours: str) -> tuple[int, list[str]]:
    """(tensors compared, differences)."""
    diffs: list[str] = []
    n = 0
    ref_files = sorted(f for f in os.listdir(ref) if f.endswith(".safetensors"))
    our_files = sorted(f for f in os.listdir(ours) if f.endswith(".safetensors"))
    if ref_files != our_files:
        diffs.append(f"files: quark {ref_files} ours {our_files}")
    for fname in ref_files:
        if fname not in our_files:
            continue
        a, b = load_file(os.path.join(ref, fname)), load_file(os.path.join(ours, fname))
        for name in sorted(set(a) | set(b)):
            if name not in a or name not in b:
                diffs.append(f"{fname}: {name} only in {'quark' if name in a else 'ours'}")
                continue
            n += 1
            x, y = a[name], b[name]
            if x.dtype != y.dtype or x.shape != y.shape:
                diffs.append(f"{name}: quark {x.dtype} {list(x.shape)} ours {y.dtype} {list(y.shape)}")
            elif not torch.equal(_bits(x), _bits(y)):  # bitwise: NaN codes compare too
                bad = (_bits(x) != _bits(y)).sum().item()
                diffs.append(f"{name}: {bad}/{x.nbytes} bytes differ ({x.dtype})")
    qc, rest, maps = [], [], []
    for root in (ref, ours):
        with open(os.path.join(root, "config.json")) as f:
            c = json.load(f)
        q = c.pop("quantization_config")
        qc.append(q)
        rest.append(c)
        with open(os.path.join(root, "model.safetensors.index.json")) as f:
            maps.append(json.load(f)["weight_map"])
    if rest[0] != rest[1]:
        diffs.append(f"config.json (other than quantization_config): quark {rest[0]} ours {rest[1]}")
    if maps[0] != maps[1]:
        diffs.append("model.safetensors.index.json weight_map differs")
    if qc[0] != qc[1]:
        keys = sorted(k for k in set(qc[0]) | set(qc[1]) if qc[0].get(k) != qc[1].get(k))
        for k in keys:
            diffs.append(f"quantization_config[{k}]: quark {json.dumps(qc[0].get(k))[:300]} ours {json.dumps(qc[1].get(k))[:300]}")
    return n, diffs


@contextlib.contextmanager
def _quiet():
    """Quark's log lines go to a file descriptor; keep them out of the table (shown on failure)."""
    with tempfile.TemporaryFile("w+") as log:
        saved = os.dup(1), os.dup(2)
        sys.stdout.flush(), sys.stderr.flush()
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            log.seek(0)
            sys.stderr.write(log.read()[-5000:])
            raise
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ours_python", default=os.path.join(ROOT, ".venv", "bin", "python"),
                        help="python of the project's venv (runs our converter)")
    parser.add_argument("--schemes", nargs="*", default=list(SCHEMES))
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES), help="source checkpoint dtypes")
    parser.add_argument("--keep", help="keep the checkpoints in this directory")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    try:
        with _quiet():
            import quark
            import quark.torch.quantization.file2file_quantization  # noqa: F401  (builds its kernels, logs)
    except ImportError as e:
        print(f"SKIPPED: amd-quark is not importable here ({e}); run bash compat/quark_setup.sh, "
              "then .venv-quark/bin/python compat/quark_check.py")
        return 0
    if not os.access(args.ours_python, os.X_OK):
        print(f"quark_check: {args.ours_python} (the project's venv) not found; give --ours_python", file=sys.stderr)
        return 2

    work = args.keep or tempfile.mkdtemp(prefix="quark_check_")
    try:
        rows, ok = check_all(args, work)
    finally:
        if not args.keep:  # each run's models and outputs (about 70 MB): CI machines share their /tmp
            shutil.rmtree(work, ignore_errors=True)
    print(f"\namd-quark {quark.__version__} file-to-file (CPU) vs convert_checkpoint quark converter")
    print(f"{'scheme':<20} {'source':<9} {'tensors':>7}  result")
    for label, dtype, n, result in rows:
        print(f"{label:<20} {dtype:<9} {n:>7}  {result}")
    print("tensors: torch.equal of the bytes, with dtype and shape; config.json (quantization_config included) and the "
          "index weight map compared too")
    return 0 if ok else 1


def check_all(args: argparse.Namespace, work: str) -> tuple[list[tuple[str, str, int, str]], bool]:
    """Every scheme and source dtype through Quark and through ours, compared: the table's rows
    and whether all were byte-identical."""
    rows, ok = [], True
    for dtype in args.dtypes:
        src = os.path.join(work, f"src_{dtype}")
        make_model(src, dtype=dtype)
        for scheme, case, quark_exclude, our_ignore in cases(args.schemes):
            tag = f"{scheme}_{dtype}" + (f"_{case}" if case else "")
            ref, ours = os.path.join(work, f"quark_{tag}"), os.path.join(work, f"ours_{tag}")
            for d in (ref, ours):
                if os.path.exists(d):
                    shutil.rmtree(d)
            os.makedirs(ref)
            with _quiet():
                run_quark(src, ref, scheme, quark_exclude)
            run_ours(src, ours, scheme, our_ignore, args.ours_python)
            n, diffs = compare(ref, ours)
            ok &= not diffs
            label = scheme + (f" ({case})" if case else "")
            rows.append((label, dtype, n, "byte-identical" if not diffs else f"{len(diffs)} differences"))
            for d in diffs[: None if args.verbose else 10]:
                print(f"  {label} {dtype}: {d}")
    return rows, ok


if __name__ == "__main__":
    sys.exit(main())
