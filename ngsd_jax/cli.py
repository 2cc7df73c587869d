"""What the command lines share: the decode, gate and device flags, the presets, and turning the
parsed flags into the typed options the libraries take (command line over preset over built-in
defaults). argparse lives here and in the entry modules only."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from ngsd_jax.decoding.pair import DecodeOptions
from ngsd_jax.decoding.risk import REFLECT_MODES, REFLECT_PARSERS
from ngsd_jax.decoding.settings import MODES
from ngsd_jax.errors import UsageError
from ngsd_jax.parallel.memory import DeviceOptions
from ngsd_jax.paths import PRESETS_DIR, compilation_cache_dir

DEFAULT_PRESET = "smollm2-135m"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    """A decode preset shipped with the package (decode/NAME.json in a checkout), or a .json path."""
    path = Path(name) if name.endswith(".json") else PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise UsageError(f"unknown preset '{name}'; known: {', '.join(preset_names())} (or a path to a .json file)")
    return json.loads(path.read_text(encoding="utf-8"))


def _floats(count: int):
    """argparse type: COUNT comma-separated numbers."""

    def parse(text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(x) for x in text.split(","))
        except ValueError:
            values = ()
        if len(values) != count:
            raise argparse.ArgumentTypeError(f"expected {count} comma-separated numbers, e.g. "
                                             f"{','.join(['0.5'] * count)}; got {text!r}")
        return values

    return parse


def add_decode_options(p: argparse.ArgumentParser, single_mode: bool = True) -> None:
    """The model, decoding and gate options, shared by every CLI that decodes (decode, eval).

    `single_mode=False` leaves out --mode, for a caller that runs several modes itself."""
    models = p.add_argument_group("models")
    models.add_argument("--preset", help=f"a decode preset from decode/ ({', '.join(preset_names())})")
    models.add_argument("--base", help="base checkpoint: HF directory, .gguf, converted checkpoint, a name under checkpoints/, or a Hugging Face Hub id ORG/NAME (default: embedded SmolLM2-135M-Instruct)")
    models.add_argument("--expert", help="expert checkpoint named like --base, or a LoRA adapter directory over the "
                        "base (default: the expert `python -m ngsd_jax.train` builds, as its adapter when it kept one)")
    models.add_argument("--dtype", choices=("float32", "bfloat16"), default=None, help="parameter dtype (default float32)")
    models.add_argument("--system-prompt", default=None, help="system prompt for the base model")
    models.add_argument("--expert-system-prompt", default=None, help="system prompt for the expert (its own format)")
    models.add_argument("--chat-template", default=None, help="Jinja template (string or .jinja file) for the base")
    models.add_argument("--expert-chat-template", default=None, help="Jinja template for the expert")
    models.add_argument("--thinking", action="store_true", default=None,
                        help="render chat prompts with enable_thinking=True (Qwen3 then may think in <think> blocks, "
                             "which the gate would run over); off by default, as the reference runs Qwen3")
    dec = p.add_argument_group("decoding")
    if single_mode:
        dec.add_argument("--mode", choices=MODES, default=None, help="ngsd (default), base, expert, always, safedecoding")
    dec.add_argument("--reflect", choices=REFLECT_MODES, default=None,
                     help="how alpha is set: json (the paper's self-reflection, default), logit, expert (the "
                          "expert's probability of opening with a refusal, read inside the decode program), off "
                          "(use --alpha)")
    dec.add_argument("--alpha", type=float, default=None, help="expert pull when --reflect off (default 0.5)")
    dec.add_argument("--reflect-parse", choices=REFLECT_PARSERS, default=None,
                     help="how the json rating is read: lenient (ours, default: the first object holding a key, "
                          "keys in any case, values clipped to 0..10, generation ends at the first '}') or "
                          "reference (the paper's: the first decodable object or list, int() values, no clipping, "
                          "the whole answer generated)")
    dec.add_argument("--reflect-prefix", action=argparse.BooleanOptionalAction, default=None,
                     help='start the json rating for the model with {"severityScore": (default on, so that small '
                          "bases rate instead of answering; the paper: --no-reflect-prefix)")
    dec.add_argument("--reflect-max-new-tokens", type=int, default=None,
                     help="budget of the json rating (default 64; the paper's: 256)")
    dec.add_argument("--reflect-all-zero-risk", type=int, default=None, metavar="R",
                     help="risk when all four scores are 0 (default: none, S is raised to 1 as the reference does "
                          "for every base but Vicuna; the reference's for Vicuna: 10)")
    dec.add_argument("--alpha-levels", type=_floats(3), default=None, metavar="LOW,MID,HIGH",
                     help="alpha below, between and above the risk thresholds (the paper's: 0.1,0.5,0.9)")
    dec.add_argument("--risk-thresholds", type=_floats(2), default=None, metavar="LOW,HIGH",
                     help="risk r (0-10) below LOW gets the low alpha, above HIGH the high one (the paper's: 5,6)")
    dec.add_argument("--max-new-tokens", type=int, default=None, help="default 128")
    dec.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    dec.add_argument("--top-p", type=float, default=1.0)
    dec.add_argument("--top-k", type=int, default=0, help="sampling top-k (0 = off); not the merge's K")
    dec.add_argument("--seed", type=int, default=0)
    dec.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    dec.add_argument("--early-stop", action="store_true", default=None,
                     help="the authors' early stop (spec §5; off by default; ngsd mode only): at 133, 140, ..., "
                          "252 tokens, when alpha >= 0.5, a refusal phrase, 3 trailing spaces, an emoji or a control "
                          "character (newline included) in the last 64 tokens caps the answer at +128 tokens, "
                          "ending at a token that is a sentence end alone; never past --max-new-tokens")
    gate = p.add_argument_group("gate (spec defaults)")
    gate.add_argument("--tau", type=float, default=None, help="neuron time constant (8)")
    gate.add_argument("--threshold", type=float, default=None, help="firing threshold (1.0)")
    gate.add_argument("--soft-reset", type=float, default=None, help="fraction of potential kept after a spike (0.6)")
    gate.add_argument("--v-reset", type=float, default=None, help="reset potential (0.0)")
    gate.add_argument("--merge-top-k", type=int, default=None, help="K of the union-top-K merge (64)")
    gate.add_argument("--divergence", choices=("tv", "kl", "js"), default=None, help="tv (default), kl, js")
    gate.add_argument("--softmax-over", choices=("tokenizer", "embedding"), default=None,
                      help="next-token distributions over the tokenizer's tokens (default: embedding rows past "
                           "them are padding) or over every embedding row (the paper's)")
    gate.add_argument("--safedecoding-m", type=int, default=None, help="SafeDecoding: steered tokens (2)")
    gate.add_argument("--safedecoding-alpha", type=float, default=None, help="SafeDecoding: alpha (3)")
    gate.add_argument("--safedecoding-common", type=int, default=None, help="SafeDecoding: common tokens c (5)")
    models.add_argument("--scan-layers", action=argparse.BooleanOptionalAction, default=False,
                        help="stack each model's layers and run them with lax.scan: compiles in a time flat in "
                             "depth (5x faster for the paper's 8B pairs on a CPU), decodes slower on a CPU "
                             "(default: unrolled layers; see BENCHMARKS.md)")
    models.add_argument("--expert-placement", choices=("sharded", "replicated"), default="sharded",
                        help="the expert's weights split over the mesh like the base's (default) or a copy on "
                             "every device (a small expert beside a big base: no all-reduces for it)")
    add_device_options(p)


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """--mesh, --device-memory and --multi-host, shared by every CLI that runs on devices."""
    group = parser.add_argument_group("devices")
    group.add_argument("--mesh", default=None, metavar="data=D,fsdp=F,tensor=T",
                       help="how the devices split the work (any subset of the axes; their product is the "
                            "device count). Default: every device on data if the models fit one device, else "
                            "the smallest tensor split that fits")
    group.add_argument("--device-memory", default=None, metavar="SIZE",
                       help="memory of one device for the memory plan (e.g. 16GiB); default: what the device "
                            "reports (TPU, GPU), unchecked on CPU")
    group.add_argument("--multi-host", action="store_true", default=None,
                       help="call jax.distributed.initialize(), so that the mesh spans every host's devices: needed "
                            "on a multi-host Cloud TPU VM slice (jax finds the workers in the VM's metadata); "
                            "automatic where TPU_WORKER_HOSTNAMES lists several hosts (GKE) or "
                            "JAX_COORDINATOR_ADDRESS is set")
    group.add_argument("--compilation-cache", type=Path, default=None, metavar="DIR",
                       help="JAX's persistent compilation cache, so that a second start compiles nothing "
                            "(default $NGSD_COMPILATION_CACHE, else ~/.cache/ngsd-jax/xla)")
    group.add_argument("--no-compilation-cache", action="store_true", help="compile every program at every start")


def device_options(args: argparse.Namespace) -> DeviceOptions:
    cache = None if args.no_compilation_cache else args.compilation_cache or compilation_cache_dir()
    return DeviceOptions(mesh=args.mesh, device_memory=args.device_memory, multi_host=args.multi_host,
                         compilation_cache=cache)


def decode_options(args: argparse.Namespace) -> DecodeOptions:
    """DecodeOptions from the flags over the preset (the default pair's own when no model is named)."""
    options = DecodeOptions()
    preset = args.preset
    if preset is None and args.base is None and args.expert is None:
        preset = DEFAULT_PRESET  # the embedded default pair decodes with its own preset
    layers = [load_preset(preset)] if preset else []
    layers.append({k: v for k, v in vars(args).items() if v is not None})
    fields = {f.name for f in dataclasses.fields(DecodeOptions)} - {"devices"}
    for layer in layers:
        for key, value in layer.items():
            if key in fields:
                setattr(options, key, value)
    if args.alpha is not None and args.reflect is None:
        options.reflect = "off"  # an explicit alpha means the user is setting it, not reflection
    options.devices = device_options(args)
    return options
