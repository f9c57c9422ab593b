"""The student: a T5 (from_pretrained or built from a T5Config) inside a module that owns the loss.

The loss runs inside ``DistillModel.forward`` so that DeepSpeed wraps one module: under ZeRO-3 every
weight the loss touches is gathered by that module's own hooks. The fused loss reads the LM-head weight
outside ``lm_head.forward``; ``params_read_outside_their_module`` names it so that the engine registers
it as an external parameter of this module (ZeRO-3 then gathers it for our forward and backward).
"""
from __future__ import annotations

import contextlib
import gc
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase, T5Config

from cotmi_ds.config import TrainConfig
from cotmi_ds.errors import UsageError
from cotmi_ds.losses.fused import fused_losses
from cotmi_ds.losses.reference import mi_term, token_ce
from cotmi_ds.model.compiled import compile_blocks
from cotmi_ds.model.family import check_model_type, scales_decoder_output, student_class
from cotmi_ds.model.hub import resolve
from cotmi_ds.model.lean import make_lean
from cotmi_ds.modes import combine, mode_of


def student_config(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedConfig:
    """The student's architecture, known before any weight exists (ZeRO-3 needs the DeepSpeed
    config, whose "auto" sizes come from d_model, before the model is built)."""
    if cfg.model == "scratch":
        return T5Config(
            vocab_size=-(-len(tokenizer) // 64) * 64,  # rounded up: friendlier matmul shapes
            d_model=cfg.scratch_d_model, d_ff=cfg.scratch_d_ff, d_kv=cfg.scratch_d_kv,
            num_layers=cfg.scratch_num_layers, num_decoder_layers=cfg.scratch_num_layers,
            num_heads=cfg.scratch_num_heads, feed_forward_proj="gated-gelu",  # as T5 v1.1
            tie_word_embeddings=False, dropout_rate=cfg.dropout or 0.0,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=tokenizer.pad_token_id)
    try:
        config = AutoConfig.from_pretrained(resolve(cfg.model, "--model"))
    except (OSError, ValueError) as e:
        raise UsageError(f"--model {cfg.model}: cannot load a model config: {str(e).splitlines()[0]}") from None
    check_model_type(config.model_type, f"--model {cfg.model}")
    if len(tokenizer) > config.vocab_size:
        raise UsageError(f"the tokenizer has {len(tokenizer)} tokens but --model {cfg.model} only "
                         f"{config.vocab_size} embeddings; pass the model's own tokenizer")
    return config


def build_student(cfg: TrainConfig, tokenizer: PreTrainedTokenizerBase,
                  ds_config: dict | None = None) -> PreTrainedModel:
    """The student, from the hub/a folder (from_pretrained) or built from its config (scratch).
    With a ZeRO-3 ``ds_config`` every parameter is partitioned over the ranks as it is created
    (``deepspeed.zero.Init``); no rank ever holds the whole model."""
    config = student_config(cfg, tokenizer)
    torch.manual_seed(cfg.seed)
    with zero3_construction(ds_config):
        if cfg.model == "scratch":
            return construct(config)
        if cfg.dropout is not None:
            config.dropout_rate = cfg.dropout
        return load_pretrained(resolve(cfg.model, "--model"), config)


def _partitioned_creation() -> dict | None:
    """The DeepSpeed config when models are to be created partitioned (inside ``zero3_construction``),
    else None. NVMe-offloaded partitions are swapped out as they are made: transformers' route then."""
    from transformers.integrations.deepspeed import deepspeed_config, is_deepspeed_zero3_enabled

    ds_config = deepspeed_config() or {}
    offload = (ds_config.get("zero_optimization") or {}).get("offload_param") or {}
    if not is_deepspeed_zero3_enabled() or offload.get("device") == "nvme":
        return None
    return ds_config


def construct(config: PreTrainedConfig) -> PreTrainedModel:
    """A T5 (or mT5) with fresh weights. Inside ``zero3_construction`` it is created under ``zero.Init``
    (each parameter partitioned as it is made) and each rank initialises only the slice it holds:
    no weight is ever whole again, where transformers' own ZeRO-3 initialisation gathers every
    module whole on every rank (the embedding and head together) and broadcasts rank 0's values."""
    ds_config = _partitioned_creation()
    if ds_config is None:
        return student_class(config)._from_config(config)
    import deepspeed
    from transformers.initialization import no_init_weights

    with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
        t5 = student_class(config)(config)
    initialise_partitions(t5, deepspeed.comm.get_rank())
    t5.tie_weights()
    # The embeddings the tie replaced (encoder's, decoder's, the head's) keep their partitions alive
    # through reference cycles in DeepSpeed's parameter attributes until a cyclic collection.
    gc.collect()
    return t5


def load_pretrained(name: str, config: PreTrainedConfig) -> PreTrainedModel:
    """A saved student (a folder, or a hub name already in the local cache) with ``config``. Inside
    ``zero3_construction``, from safetensors weights: created partitioned as ``construct`` creates
    it, then each rank reads its partitions' slices from the files (model/weights.py), so that no
    rank holds a whole weight. Otherwise ``from_pretrained``."""
    from cotmi_ds.model import weights

    ds_config = _partitioned_creation()
    folder = _local_folder(name) if ds_config is not None else None
    files = weights.weight_files(folder) if folder is not None else None
    if files is None or not all(path.is_file() for path in set(files.values())):  # (a shard missing:
        # from_pretrained says so). fp32 whatever the checkpoint stores: transformers >= 5 would keep
        # a bf16 save in bf16 (dtype="auto"), and DeepSpeed trains an fp32 run in the dtype it is given.
        return student_class(config).from_pretrained(name, config=config, dtype=torch.float32)
    import deepspeed
    from transformers import GenerationConfig
    from transformers.initialization import no_init_weights

    def partitioned(make):
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            return make()

    t5 = partitioned(lambda: student_class(config)(config))
    t5.tie_weights()
    gc.collect()  # (as in construct)
    weights.untie_head_if_saved(t5, files, lambda: partitioned(
        lambda: nn.Linear(config.d_model, config.vocab_size, bias=False)))
    weights.load_partitions(t5, files, f"--model {name}")
    if (folder / "generation_config.json").is_file():
        t5.generation_config = GenerationConfig.from_pretrained(folder)
    return t5.eval()  # as from_pretrained returns it


def _local_folder(name: str) -> Path | None:
    """The folder holding a model's files: the path given, or a hub model's snapshot in the local
    cache (none: transformers' route, which downloads)."""
    if Path(name).expanduser().is_dir():
        return Path(name).expanduser()
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(name, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a hub name): from_pretrained reports it
        return None


def initialise_partitions(t5: PreTrainedModel, rank: int) -> None:
    """T5's own ``initialize_weights`` applied to each ZeRO-3 parameter's local slice. T5 draws
    every element independently (normal or constant, scales from the config, never from a tensor's
    shape), so initialising a flat slice in place gives each element the distribution it has in a
    whole tensor. Each rank draws from its own stream, derived from the seed and its rank (slices
    never repeat one another), and leaves the global random state as it found it."""
    params = list(t5.parameters())
    placeholders = [p.data for p in params]
    try:
        for p in params:
            p.data = p.ds_tensor.data
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((torch.initial_seed() * 1_000_003 + rank) % 2**63)
            t5.initialize_weights()
    finally:
        for p, placeholder in zip(params, placeholders):
            p.data = placeholder


@contextlib.contextmanager
def zero3_construction(ds_config: dict | None):
    """While open, and only for a ZeRO-3 config: transformers' DeepSpeed integration is on, so
    ``from_pretrained``/``_from_config`` create each parameter inside ``deepspeed.zero.Init`` (a
    rank keeps only its partition) and ``from_pretrained`` loads checkpoint shards module by
    module into the partitions. The integration follows a weak reference: the object must stay
    alive for the whole build, and is switched off afterwards so later models in this process
    (export, tests) are plain."""
    stage = ((ds_config or {}).get("zero_optimization") or {}).get("stage", 0)
    if int(stage) != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del keep_alive
        unset_hf_deepspeed_config()


def enable_activation_checkpointing(t5: PreTrainedModel) -> None:
    """Every encoder and decoder block (in training mode) keeps only its inputs and is recomputed in
    the backward. Non-reentrant checkpointing: exact gradients, whether or not a block's inputs need
    a gradient, and ZeRO-3's hooks gather the weights again for the recomputation."""
    enable = getattr(t5, "activation_checkpointing_enable", None)  # transformers >= 5.x; older: the alias
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        t5.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


class DistillModel(nn.Module):
    """T5 + the mode's loss. ``forward(batch)`` returns the loss parts and their weighted ``total``;
    the mode (modes.py) decides which passes run and how the parts combine."""

    def __init__(self, t5: PreTrainedModel, cfg: TrainConfig):
        super().__init__()
        self.t5 = t5
        self.mode = mode_of(cfg)
        self.alpha, self.beta = cfg.alpha, cfg.beta
        self.loss_impl, self.mi_variant = cfg.loss, cfg.mi_variant
        self.loss_chunk_mib, self.encoder_once = cfg.loss_chunk_mib, cfg.encoder_once
        # T5 v1.0 scales the decoder output by d_model^-0.5 before its tied head; v1.1, Flan and mT5 do not.
        self.head_scale = t5.config.d_model ** -0.5 if scales_decoder_output(t5.config) else None
        t5.set_attn_implementation(cfg.attention)  # encoder, decoder and generation; not saved in exports
        self.sdpa = cfg.attention == "sdpa"
        if cfg.lean_layers:
            make_lean(t5)
        if cfg.gradient_checkpointing:
            enable_activation_checkpointing(t5)
        if cfg.compile:  # after the swaps above: the compiled blocks trace the lean layers
            compile_blocks(t5)

    def params_read_outside_their_module(self) -> list[nn.Parameter]:
        return [self.t5.lm_head.weight] if self.loss_impl == "fused" else []

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        parts = self._fused_parts(batch) if self.loss_impl == "fused" else self._reference_parts(batch)
        parts["total"] = combine(parts, self.mode, self.alpha, self.beta)
        return parts

    # --- --loss reference: HF's forward per task, full logits, the plain losses ----------------
    def _logits(self, input_ids, attention_mask, labels) -> torch.Tensor:
        out = self.t5(input_ids=input_ids, attention_mask=attention_mask,
                      decoder_input_ids=self.t5._shift_right(labels), use_cache=False)
        return out.logits

    def _reference_parts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # The label pass always runs (in `single` its target is rationale + separator + label);
        # the rationale pass only in the modes that train it (dss, mi).
        label_logits = self._logits(batch["pred_input_ids"], batch["pred_attention_mask"], batch["labels"])
        parts = {self.mode.label_part: token_ce(label_logits, batch["labels"])}
        if self.mode.rationale_pass:
            rationale_logits = self._logits(batch["expl_input_ids"], batch["expl_attention_mask"],
                                            batch["rationale_labels"])
            parts["rationale_ce"] = token_ce(rationale_logits, batch["rationale_labels"])
            if self.mode.mi:
                parts["mi"] = mi_term(self.mi_variant, label_logits, rationale_logits, batch["labels"],
                                      batch["rationale_labels"])
        return parts

    # --- --loss fused: encoder (once for both tasks), decoders, then the chunked loss ----------
    def _key_mask(self, attention_mask: torch.Tensor) -> torch.Tensor:
        """The padding mask as SDPA reads it, [B, 1, 1, S] booleans. Given a 2D mask, transformers
        first asks whether any key is padded (one wait for the device per mask, three per step) to
        leave the mask out when none is; a 4D mask it takes as it is. With no padding the two give
        the same numbers: SDPA's additive mask is then the position bias alone either way."""
        return attention_mask[:, None, None, :].bool() if self.sdpa else attention_mask

    def _encode(self, input_ids, attention_mask) -> torch.Tensor:
        return self.t5.encoder(input_ids=input_ids, attention_mask=self._key_mask(attention_mask))[0]

    def _decode(self, encoder_states, attention_mask, labels) -> torch.Tensor:
        """Final decoder states as the LM head sees them (scaled for T5 v1.0)."""
        h = self.t5.decoder(input_ids=self.t5._shift_right(labels), encoder_hidden_states=encoder_states,
                            encoder_attention_mask=self._key_mask(attention_mask), use_cache=False)[0]
        return h * self.head_scale if self.head_scale is not None else h

    def _encode_both(self, batch) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """Encoder states and masks of the label and rationale inputs. With ``encoder_once``, one
        encoder call on the 2B inputs right-padded to the longer one (padded keys are masked, so the
        states of real tokens are those of two separate calls)."""
        pred = batch["pred_input_ids"], batch["pred_attention_mask"]
        expl = batch["expl_input_ids"], batch["expl_attention_mask"]
        if not self.encoder_once:
            return (self._encode(*pred), pred[1]), (self._encode(*expl), expl[1])
        width = max(pred[0].shape[1], expl[0].shape[1])

        def widen(x, value):
            return nn.functional.pad(x, (0, width - x.shape[1]), value=value)

        ids = torch.cat([widen(pred[0], self.t5.config.pad_token_id), widen(expl[0], self.t5.config.pad_token_id)])
        mask = torch.cat([widen(pred[1], 0), widen(expl[1], 0)])
        states = self._encode(ids, mask)
        B = pred[0].shape[0]
        return (states[:B], mask[:B]), (states[B:], mask[B:])

    def _fused_parts(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        weight = self.t5.lm_head.weight
        if not self.mode.rationale_pass:  # label pass only: its CE, no MI
            mask = batch["pred_attention_mask"]
            h_lab = self._decode(self._encode(batch["pred_input_ids"], mask), mask, batch["labels"])
            ce = fused_losses(weight, h_lab, batch["labels"], chunk_mib=self.loss_chunk_mib)["label_ce"]
            return {self.mode.label_part: ce}
        (enc_lab, mask_lab), (enc_rat, mask_rat) = self._encode_both(batch)
        h_lab = self._decode(enc_lab, mask_lab, batch["labels"])
        h_rat = self._decode(enc_rat, mask_rat, batch["rationale_labels"])
        return fused_losses(weight, h_lab, batch["labels"], h_rat, batch["rationale_labels"],
                            mi_variant=self.mi_variant if self.mode.mi else None, chunk_mib=self.loss_chunk_mib)
