"""Generation through the pipeline: `hpcpipe generate` on any (pp, tp) layout.

Each prompt is one micro-batch (a batch of one sequence). Step 0 feeds the whole prompt
(the prefill); every later step feeds one token per prompt. Each stage keeps a key/value cache
for its own layers and each prompt (hpcpipe.models.api.DecodeState), so a boundary carries one
token's activations per step. The last stage gathers the vocabulary-parallel logits of the last
position over tp, its tp rank 0 picks the next token (argmax, or a draw from prompt i's own
torch.Generator seeded with `seed + i`), and sends it back to pipeline rank 0, whose tp rank 0
broadcasts it over tp. Every rank walks the same (step, prompt) order and every send is
non-blocking, so with several prompts the stages overlap: while the last stage works on
prompt 1, the first already embeds prompt 0's next token. The tokens are the same on every
layout: the same logits (up to rounding) are sampled on one rank in the same order.

Without the cache (kv_cache=False) every step recomputes the whole prefix: the reference the
cache is tested against, and the way to generate with a family that has no cache support.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch

from hpcpipe.config import TORCH_DTYPES, Config, ConfigError
from hpcpipe.models import get_spec
from hpcpipe.models.api import (
    DecodeState,
    Stage,
    build_stage,
    layer_costs,
    set_decode_state,
    supports_decoding,
)
from hpcpipe.parallel.grid import Grid, Topology
from hpcpipe.parallel.p2p import P2P, allgather, allreduce_, broadcast_, make_tag
from hpcpipe.parallel.tensor_parallel import TPContext, parallelize_stage, require_plan
from hpcpipe.pipeline.partition import PartitionError, partition_layers
from hpcpipe.train import init_from
from hpcpipe.train.trainer import master_dtype, pick_device

FORWARD, TOKEN = 0, 1  # make_tag directions: activations downstream, tokens back to stage 0


@dataclass(frozen=True)
class Sampling:
    """How the next token is picked: greedy (argmax) unless a temperature is given."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = the whole vocabulary
    seed: int = 0  # prompt i draws from torch.Generator().manual_seed(seed + i)

    def __post_init__(self) -> None:
        t = self.temperature
        if not (isinstance(t, int | float) and math.isfinite(t) and t >= 0):
            raise ConfigError(f"--temperature must be a finite number >= 0 (got {t!r})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"--top-k must be an integer >= 0 (got {self.top_k!r})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> int:
    """The next token from one position's logits (vocab,): argmax, or a top-k draw."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    scores = logits.detach().to("cpu", torch.float64) / sampling.temperature
    if 0 < sampling.top_k < scores.numel():
        kth = torch.topk(scores, sampling.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_prompts(model, prompts: list[list[int]], max_new_tokens: int) -> None:
    """Every prompt non-empty, its ids in the vocabulary, and prompt + new tokens in seq_len."""
    if not prompts:
        raise ConfigError("nothing to generate from: give --prompt TEXT or --tokens IDS")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1 (got {max_new_tokens!r})")
    for i, ids in enumerate(prompts):
        if not ids:
            raise ConfigError(
                f"prompt {i} has no tokens; generation continues a prompt of at least one token"
            )
        bad = [t for t in ids if not 0 <= t < model.vocab_size]
        if bad:
            raise ConfigError(
                f"prompt {i}: token id {bad[0]} is outside the model's vocabulary "
                f"0..{model.vocab_size - 1} (model.vocab_size={model.vocab_size}); --prompt "
                "text is encoded by the tokenizer the checkpoint records (bytes when none), "
                "--tokens gives ids directly"
            )
        if len(ids) + max_new_tokens > model.seq_len:
            raise ConfigError(
                f"prompt {i} has {len(ids)} tokens, + --max-new-tokens {max_new_tokens} = "
                f"{len(ids) + max_new_tokens} > model.seq_len={model.seq_len}, the longest "
                "sequence the model takes; shorten the prompt, generate fewer tokens, or raise "
                "--model.seq_len (GPT-2: up to model.max_positions, its position table)"
            )


def check_layout(config: Config, world_size: int, kv_cache: bool = True):
    """(spec, partition) of a generation run; ConfigError for what cannot run (no MPI needed)."""
    p, model = config.parallel, config.model
    if p.dp != 1:
        raise ConfigError(
            f"generation runs one pipeline: parallel.dp must be 1 (got {p.dp}); launch "
            f"pp x tp = {p.pp * p.tp} ranks, and pass several prompts to keep the stages busy"
        )
    if p.pp * p.tp != world_size:
        raise ConfigError(
            f"pp={p.pp} x tp={p.tp} = {p.pp * p.tp} ranks, but the job has {world_size} MPI "
            f"processes; launch with mpiexec -n {p.pp * p.tp} or change --pp/--tp"
        )
    spec = get_spec(model.arch)
    if kv_cache and not supports_decoding(spec, model):
        raise ConfigError(
            f"model.arch={spec.name!r} has no module declaring `decode_state` (the key/value "
            "cache protocol of hpcpipe.models.api), so it cannot generate one token at a time; "
            "pass --no-kv-cache to recompute the whole prefix every step, or add the protocol "
            "to the family's attention"
        )
    try:
        if p.tp > 1:
            require_plan(spec).check(model, p.tp)
        partition = partition_layers(
            layer_costs(spec, model, p.balance), p.pp, counts=p.partition or None
        )
    except PartitionError as exc:
        raise ConfigError(str(exc)) from None
    except ValueError as exc:  # TensorParallelError, unknown balance
        raise ConfigError(str(exc)) from None
    return spec, partition


def load_stage(config: Config, spec, layers: range, tp: TPContext, path, device) -> Stage:
    """This rank's stage with the weights of PATH (its tp slice), in train.dtype, for inference."""
    model = config.model
    dtype = TORCH_DTYPES[config.train.dtype]
    # NOTE: built and loaded at full precision, then cast once: a 16-bit stage holds the
    # rounding of the stored values, not of a 16-bit random init plus a copy.
    stage = build_stage(spec, model, layers, config.train.seed, master_dtype(dtype))
    tp_specs = parallelize_stage(stage, spec, model, tp) if tp.size > 1 else {}
    canonical = {n: names[0] for names in spec.tie_groups(model).values() for n in names[1:]}
    init_from.load_weights(list(stage.named_parameters()), canonical, tp_specs, model, path)
    return stage.to(device=device, dtype=dtype).eval()


@dataclass
class Result:
    """What a generation run returns: new tokens per prompt on world rank 0 (else None)."""

    tokens: list[list[int]] | None
    seconds: float  # from the first prefill to the last token, on world rank 0
    new_tokens: int  # prompts x max_new_tokens
    layout: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else float("inf")


def generate(
    config: Config,
    comm,
    path,
    prompts: list[list[int]],
    max_new_tokens: int,
    sampling: Sampling | None = None,
    kv_cache: bool = True,
) -> Result:
    """Collective over comm (pp x tp ranks): continue each prompt by max_new_tokens tokens."""
    sampling = sampling or Sampling()
    check_prompts(config.model, prompts, max_new_tokens)
    spec, partition = check_layout(config, comm.Get_size(), kv_cache)
    torch.set_num_threads(config.train.threads)
    p = config.parallel
    grid = Grid(comm, Topology.parse(1, p.pp, p.tp, p.order))
    tp = TPContext(grid.tp_comm, grid.tp_rank, p.tp, p.timeout)
    device = torch.device(pick_device(config, comm))
    stage = load_stage(config, spec, partition.layers(grid.pp_rank), tp, path, device)
    run = _Run(config, grid, tp, stage, spec, prompts, max_new_tokens, sampling, kv_cache)
    # everyone loaded: time the generation only
    allreduce_(grid.cart, torch.zeros(1), timeout=p.timeout)
    start = time.perf_counter()
    with torch.no_grad():
        tokens = run.loop()
    seconds = time.perf_counter() - start
    grid.free()  # NOTE: not after a failure, which ends the job (a peer may never free)
    leader = grid.world_rank == 0
    return Result(
        tokens if leader else None,
        seconds,
        len(prompts) * max_new_tokens,
        {"pp": p.pp, "tp": p.tp, "dtype": config.train.dtype, "kv_cache": kv_cache},
    )


class _Run:
    """One rank's part of a generation run (see the module docstring for the order)."""

    def __init__(self, config, grid, tp, stage, spec, prompts, max_new, sampling, kv_cache):
        self.model, self.grid, self.tp, self.stage = config.model, grid, tp, stage
        self.prompts, self.max_new, self.sampling = prompts, max_new, sampling
        self.kv_cache = kv_cache
        self.K, self.rank = config.parallel.pp, grid.pp_rank
        self.first, self.last = self.rank == 0, self.rank == self.K - 1
        self.timeout = config.parallel.timeout
        self.device = next(stage.parameters()).device
        self.dtype = next(stage.parameters()).dtype
        self.p2p = P2P(grid.pp_comm, timeout=self.timeout)
        # what a boundary carries for one sequence, its dim 1 set per step (see api.py)
        self.boundary = list(spec.boundary_shape(config.model, 1))
        self.sequences = [list(ids) for ids in prompts]  # grown on pipeline rank 0
        self.generators = [
            torch.Generator().manual_seed(sampling.seed + i) for i in range(len(prompts))
        ]
        self.sampled: dict[int, int] = {}  # pp = 1: micro-batch -> token picked this step
        self.state = None
        if kv_cache:
            lengths = [len(ids) for ids in prompts]
            self.state = DecodeState(capacity=lambda m: lengths[m] + max_new)
            set_decode_state(stage, self.state)

    def loop(self) -> list[list[int]]:
        """Every step of every prompt; the new tokens (on pipeline rank 0)."""
        try:
            for step in range(self.max_new):
                for m in range(len(self.prompts)):
                    if self.first and step > 0:
                        self.sequences[m].append(self.next_token(m, step - 1))
                    self.forward(m, step)
            if self.first:
                for m in range(len(self.prompts)):
                    self.sequences[m].append(self.next_token(m, self.max_new - 1))
            self.p2p.flush()
        finally:
            set_decode_state(self.stage, None)
        return [seq[len(ids) :] for seq, ids in zip(self.sequences, self.prompts, strict=True)]

    def window(self, m: int, step: int) -> tuple[int, int]:
        """(tokens fed, position of the first) for prompt m at this step."""
        n = len(self.prompts[m])
        if not self.kv_cache:
            return n + step, 0
        return (n, 0) if step == 0 else (1, n + step - 1)

    def forward(self, m: int, step: int) -> None:
        """Prompt m's work at this step on this stage: receive, compute, pass on."""
        t, offset = self.window(m, step)
        transfer = None
        if self.first:
            x = torch.tensor([self.sequences[m][-t:]], dtype=torch.long, device=self.device)
        else:
            shape = [*self.boundary[:1], t, *self.boundary[2:]]
            tag = make_tag(m, self.rank, FORWARD, self.K, self.p2p.tag_ub)
            what = f"prompt {m}, step {step}"
            transfer = self.p2p.irecv(shape, self.dtype, self.device, self.rank - 1, tag, what)
            x = self.p2p.wait(transfer)
        if self.state is not None:
            self.state.select(m, offset)
        y = self.stage(x)
        if transfer is not None:
            self.p2p.release(transfer)
        if step == self.max_new - 1 and self.state is not None:
            self.state.drop(m)  # prompt m is done on this stage
        if not self.last:
            tag = make_tag(m, self.rank + 1, FORWARD, self.K, self.p2p.tag_ub)
            self.p2p.isend(y.contiguous(), self.rank + 1, tag)
            return
        token = self.sample(m, y[0, -1])
        if self.tp.rank != 0:
            return
        if self.K == 1:
            self.sampled[m] = token
        else:
            message = torch.tensor([token], dtype=torch.long)
            self.p2p.isend(message, 0, make_tag(m, 0, TOKEN, self.K, self.p2p.tag_ub))

    def sample(self, m: int, logits: torch.Tensor) -> int:
        """The next token of prompt m from the last position's (vocab-split) logits.

        Collective over tp on the last stage; the token is valid on tp rank 0 only.
        """
        if self.tp.size > 1:
            logits = allgather(self.tp.comm, logits, self.timeout).reshape(-1)
        if self.tp.rank != 0:
            return -1
        vocab = logits[: self.model.vocab_size]  # drop tp's padding rows (-inf)
        return pick(vocab.cpu(), self.sampling, self.generators[m])

    def next_token(self, m: int, step: int) -> int:
        """Pipeline rank 0: prompt m's token picked at `step`, on every tp rank."""
        token = torch.zeros(1, dtype=torch.long)
        if self.tp.rank == 0:
            if self.K == 1:
                token[0] = self.sampled.pop(m)
            else:
                tag = make_tag(m, 0, TOKEN, self.K, self.p2p.tag_ub)
                what = f"the token of prompt {m}, step {step}"
                transfer = self.p2p.irecv((1,), torch.long, "cpu", self.K - 1, tag, what)
                token.copy_(self.p2p.wait(transfer))
                self.p2p.release(transfer)
        if self.tp.size > 1:
            broadcast_(self.tp.comm, token, 0, self.timeout)
        return int(token[0])
