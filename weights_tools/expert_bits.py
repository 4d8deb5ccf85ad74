"""`edge expert-bits STORE --bits B`: expert-wise bitwidth adaptation (EdgeMoE, Yi et al. 2023, section 3.3).

1. Variants: every expert requantized from its source record to each type of VARIANT_TYPES that is smaller
   per weight than the source and whose blocks fit its rows (gguf's reference quantizer), laid out like
   `experts/` (one record per expert): `bits/<type>/blk.<i>`.
2. Bounds: each expert ends at LOW, the smallest variant, or HIGH, the source's type (`--bounds` picks two
   others). The paper picks the two uniform bitwidths that bracket an accuracy tolerance; here the user sets a
   size, and on moefied SmolLM2 mixing the two ends beat the two bitwidths around the target (at 5.5 bits:
   17.38 against 18.07, uniform q5_0 17.66; benchmarks/README.md).
3. Profile (the paper's importance): with every expert at HIGH, each expert alone is moved to LOW and the
   perplexity of held-out calibration tokens is measured; its rise over all-HIGH is the expert's sensitivity.
   Each measurement reruns only the layers from the expert's on (weights_tools.calibrate.LayerReplay). The
   paper profiles INT2 against INT4 on a validation set's Rouge-2.
4. Choose: experts sorted least sensitive first; the first K go to LOW, the rest stay at HIGH, K the smallest
   that meets the size (the paper grows K until the loss reaches the tolerance). Non-expert weights stay as
   stored (the paper keeps them at high precision: they run for every token).

Resumable: variants and profiles go into `bits.partial/` in the store (a marker per written layer, the scores
per profiled layer); the attributes are the commit point, so an interrupted run leaves the store running its
experts as before. A store that already has the variants and the profile of the bounds only gets a new choice.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from edge import quants
from edge.errors import EdgeError

VARIANT_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0")


def expert_params(cfg) -> int:
    """Weights of one expert (gate, up, down)."""
    return 3 * cfg.dim * cfg.expert_hidden


def variant_types(store) -> list[str]:
    """The lower bitwidths the store's experts can be requantized to: smaller than the source's, blocks that
    divide both row widths (dim for gate and up, the expert width for down)."""
    from weights_tools.convert import QUANTS

    cfg = store.config
    keep = kind_bits(store, "keep")
    out = []
    for name in VARIANT_TYPES:
        block = quants.FORMATS[QUANTS[name]].block_size
        if format_bits(store, name) < keep and cfg.dim % block == 0 and cfg.expert_hidden % block == 0:
            out.append(name)
    return out


def kind_bytes(store, kind: str, layouts: dict | None = None) -> np.ndarray:
    """Bytes of one expert record of each layer in `kind` ("keep": the source's)."""
    from edge.experts import ExpertLayout

    lays = store.expert_layouts if kind == "keep" else (layouts or store.bits["types"])[kind]
    return np.array([ExpertLayout(lay).bytes for lay in lays], np.int64)


def kind_bits(store, kind: str, layouts: dict | None = None) -> float:
    cfg = store.config
    return float(8 * kind_bytes(store, kind, layouts).sum() / (cfg.n_layers * expert_params(cfg)))


def format_bits(store, kind: str) -> float:
    """Bits per weight of `kind` from its format alone (before its variant is written)."""
    from weights_tools.convert import QUANTS

    if kind == "keep":
        return kind_bits(store, "keep")
    fmt = quants.FORMATS[QUANTS[kind]]
    return 8 * fmt.block_bytes / fmt.block_size


def choice_bytes(store, choice: list[list[str]], layouts: dict) -> int:
    sizes = {kind: kind_bytes(store, kind, layouts) for kind in {k for row in choice for k in row}}
    return int(sum(sizes[kind][i] for i, row in enumerate(choice) for kind in row))


def bounds(store, bits: float, layouts: dict) -> tuple[str, str] | None:
    """(LOW, HIGH): the smallest variant and the source's type, or None when `bits` keeps every expert as the
    source's. Mixing the two ends measured better than the two uniform bitwidths around the target on moefied
    SmolLM2 (benchmarks/README.md), and one profile then serves every target."""
    kinds = sorted(["keep", *layouts], key=lambda k: kind_bits(store, k, layouts))
    sizes = [kind_bits(store, k, layouts) for k in kinds]
    if bits >= sizes[-1]:
        return None
    if bits < sizes[0]:
        raise EdgeError(f"--bits {bits:g}: below the smallest variant ({kinds[0]}, {sizes[0]:.2f} bits per expert "
                        f"weight); raise --bits to at least {sizes[0]:.2f}")
    return kinds[0], "keep"


def choose(scores: np.ndarray, low: str, high: str, low_bytes: np.ndarray, high_bytes: np.ndarray,
           target: int) -> list[list[str]]:
    """Least sensitive experts to LOW until the experts' bytes are at most `target`, the rest at HIGH."""
    n_layers, n_experts = scores.shape
    choice = [[high] * n_experts for _ in range(n_layers)]
    total = int(high_bytes.sum()) * n_experts
    for flat in np.argsort(scores, axis=None, kind="stable"):
        if total <= target:
            break
        i, e = divmod(int(flat), n_experts)
        choice[i][e] = low
        total -= int(high_bytes[i] - low_bytes[i])
    return choice


class Variants:
    """A resident model whose experts can be switched between bitwidths (profile, evaluation)."""

    def __init__(self, store, kinds: list[str], n_ctx: int, threads: int | None = None, tensors=None):
        """tensors(layer, kind): the layer's experts in `kind` (default: the store's records)."""
        from edge.model import Transformer

        self.store = store
        self.model = Transformer(store, n_ctx, backend="ggml", threads=threads)
        lin = self.model.backend.linear_group
        tensors = tensors or store.expert_tensors
        self.groups = {kind: [[(lin([g, u]), lin([d])) for g, u, d in tensors(i, kind)]
                              for i in range(store.config.n_layers)] for kind in kinds}

    def apply(self, choice: list[list[str]]) -> None:
        experts = self.model.parts.ffn.experts.experts  # edge.parts.ResidentExperts: per layer, per expert
        for i in range(len(experts)):
            experts[i] = [self.groups[kind][i][e] for e, kind in enumerate(choice[i])]

    def set(self, i: int, e: int, kind: str) -> None:
        self.model.parts.ffn.experts.experts[i][e] = self.groups[kind][i][e]

    def perplexity(self, choice: list[list[str]], wins: list[list[int]]) -> float:
        from edge.evaluate import perplexity

        self.apply(choice)
        return perplexity(self.model.nll, wins).ppl


def held_out(store, tokens: int) -> list[int]:
    """`tokens` of calibration text after the first 1024 (what --calibrate measures on), BOS first if wanted."""
    from edge.evaluate import calibration_text
    from edge.tokenizer import Tokenizer

    tok = Tokenizer(store.tokenizer_path, store.config.arch, store.chat_template)
    ids = tok.encode(calibration_text(), add_bos=False)[1024:]
    if len(ids) < tokens:
        raise EdgeError(f"the calibration text has {len(ids)} held-out tokens, {tokens} asked; lower --calib-tokens")
    bos = [tok.bos_id] if tok.add_bos else []
    return bos + ids[:tokens - len(bos)]


def requantized(store, layer: int, kind: str) -> list[tuple]:
    """The layer's experts requantized from their source records to `kind` (gguf's reference quantizer)."""
    from weights_tools.convert import QUANTS, requantize

    if kind == "keep":
        return store.expert_tensors(layer, "keep")
    return [tuple(requantize(t, QUANTS[kind]) for t in ex) for ex in store.expert_tensors(layer, "keep")]


def _write_variants(store, partial: Path, kinds: list[str], state: dict, tell) -> None:
    import zarr
    from zarr.storage import LocalStore

    from edge.store import expert_layout
    from weights_tools.convert import write_array

    cfg = store.config
    group = zarr.open_group(LocalStore(partial), mode="a")
    for kind in kinds:
        lays = state["types"].setdefault(kind, [None] * cfg.n_layers)
        for i in range(cfg.n_layers):
            tell(f"requantize layer {i} to {kind}")
            if lays[i] is not None:
                continue
            experts = requantized(store, i, kind)
            recs = [np.concatenate([p.raw.reshape(-1) for p in parts]) for parts in experts]
            write_array(group, f"{kind}/blk.{i}", np.stack(recs), 1)
            lays[i] = {**expert_layout(*experts[0], 1), "n": cfg.n_experts}  # every expert's record alike
            _save_state(partial, state)


def _save_state(partial: Path, state: dict) -> None:
    tmp = partial / "state.tmp.json"
    tmp.write_text(json.dumps(state))
    tmp.replace(partial / "state.json")


def _profile(var: Variants, replay, low: str, high: str, partial: Path, state: dict, tell) -> dict:
    """Each expert alone at LOW, the others at HIGH: perplexity rise over all at HIGH (per layer, resumable)."""
    cfg = var.store.config
    key = f"{low}/{high}"
    prof = state["profiles"].setdefault(key, {"tokens": len(replay.tokens), "scores": [None] * cfg.n_layers})
    everyone = [[high] * cfg.n_experts for _ in range(cfg.n_layers)]
    var.apply(everyone)
    replay.inputs()
    prof["base"] = replay.ppl_from(cfg.n_layers)
    for i in range(cfg.n_layers):
        if prof["scores"][i] is not None:
            continue
        row = []
        for e in range(cfg.n_experts):
            tell(f"profile layer {i} expert {e}")
            var.set(i, e, low)
            row.append(replay.ppl_from(i) - prof["base"])
            var.set(i, e, high)
        prof["scores"][i] = row
        _save_state(partial, state)
    var.apply([[low] * cfg.n_experts for _ in range(cfg.n_layers)])
    replay.inputs()
    prof["low"] = replay.ppl_from(cfg.n_layers)
    return prof


def adapt(store_path: str | Path, bits: float, tokens: int = 128, threads: int | None = None, progress=None,
          pair: tuple[str, str] | None = None) -> dict:
    """Choose every expert's bitwidth for `bits` bits per expert weight; returns attributes["edge"]["bits"].
    pair: (LOW, HIGH) instead of the smallest variant and the source's type. progress(done, total, label)."""
    from edge.store import Store
    from weights_tools.calibrate import LayerReplay
    from weights_tools.convert import commit_group, write_attrs

    store_path = Path(store_path)
    store = Store(store_path)
    cfg = store.config
    if not cfg.n_experts:
        raise EdgeError(f"{store_path}: not a mixture-of-experts model; expert bitwidths need experts")
    if not 0 < bits < 64:
        raise EdgeError(f"--bits {bits:g}: give bits per expert weight, e.g. 5.5")
    kinds = variant_types(store)
    if not kinds:
        raise EdgeError(f"{store_path}: the experts ({kind_bits(store, 'keep'):.2f} bits per weight) have no smaller "
                        f"variant among {', '.join(VARIANT_TYPES)} whose blocks fit their rows")
    source = store.source["sha256"]
    committed = store.bits
    partial = store_path / "bits.partial"
    state = None
    if partial.exists():
        try:
            state = json.loads((partial / "state.json").read_text())
        except (OSError, ValueError):
            state = None
        if state is None or state.get("source") != source:
            shutil.rmtree(partial)
            state = None
    committed_here = committed is not None and committed.get("source") == source
    if state is None and committed_here:
        state = {"source": source, "types": committed["types"], "profiles": committed["profiles"]}
    state = state or {"source": source, "types": {}, "profiles": {}}
    done_kinds = {k for k, lays in state["types"].items() if None not in lays}
    layouts = {k: state["types"][k] for k in done_kinds}
    if pair is not None:
        known = {"keep", *kinds}
        if not set(pair) <= known:
            raise EdgeError(f"--bounds {','.join(pair)}: choose two of {', '.join(sorted(known))}")
        if format_bits(store, pair[0]) >= format_bits(store, pair[1]):
            raise EdgeError(f"--bounds {','.join(pair)}: the first must have fewer bits than the second")
        if bits < format_bits(store, pair[0]):
            raise EdgeError(f"--bits {bits:g}: below --bounds' lower bitwidth ({pair[0]}, "
                            f"{format_bits(store, pair[0]):.2f} bits per weight); raise --bits")
    fixed = pair
    if set(kinds) <= done_kinds:  # bounds need the variants' sizes; with all written they are known now
        pair = fixed or bounds(store, bits, layouts)
        if _profiled(state, pair) and committed_here:
            attrs = _attrs(store, state, bits, pair)
            write_attrs(store_path, "bits", attrs)  # only a new choice
            return attrs
    if committed is not None and not partial.exists():  # more to do: take the committed part back, unreferenced
        write_attrs(store_path, "bits", None)
        (store_path / "bits").rename(partial)
    partial.mkdir(exist_ok=True)
    _save_state(partial, state)
    store = Store(store_path)

    n_layers, n_experts = cfg.n_layers, cfg.n_experts
    total = len(kinds) * n_layers + n_layers * n_experts
    count = [0]

    def tell(label: str) -> None:
        count[0] += 1
        if progress:
            progress(min(count[0], total), total, label)

    _write_variants(store, partial, kinds, state, tell)
    layouts = state["types"]
    pair = fixed or bounds(store, bits, layouts)
    if not _profiled(state, pair):
        ids = held_out(store, tokens)
        var = Variants(store, sorted({*pair}), len(ids), threads, lambda i, kind: requantized(store, i, kind))
        _profile(var, LayerReplay(var.model, ids), *pair, partial, state, tell)
        _save_state(partial, state)
    attrs = _attrs(store, state, bits, pair)
    (partial / "state.json").unlink()
    commit_group(store_path, partial, "bits", attrs)
    return attrs


def _profiled(state: dict, pair: tuple[str, str] | None) -> bool:
    """Whether the profile the choice needs is complete (none needed when every expert keeps its type)."""
    if pair is None:
        return True
    prof = state["profiles"].get(f"{pair[0]}/{pair[1]}")
    return prof is not None and None not in prof["scores"]


def _attrs(store, state: dict, bits: float, pair: tuple[str, str] | None) -> dict:
    cfg = store.config
    layouts = state["types"]
    if pair is None:
        choice = [["keep"] * cfg.n_experts for _ in range(cfg.n_layers)]
    else:
        low, high = pair
        scores = np.array(state["profiles"][f"{low}/{high}"]["scores"], np.float64)
        target = int(bits * cfg.n_layers * cfg.n_experts * expert_params(cfg) / 8)
        choice = choose(scores, low, high, kind_bytes(store, low, layouts), kind_bytes(store, high, layouts), target)
    size = choice_bytes(store, choice, layouts)
    return {"source": state["source"], "types": layouts, "profiles": state["profiles"], "target_bits": bits,
            "bounds": list(pair) if pair else None, "choice": choice, "expert_bytes": size,
            "bits_per_weight": round(8 * size / (cfg.n_layers * cfg.n_experts * expert_params(cfg)), 4)}
