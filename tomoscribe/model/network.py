"""The default tomoscribe network: encoder, segmentation head, projector, LM.

::

    x (B, 2, D, H, W)
      -> DCFormerEncoder -> stage features f1..f4
      -> SegHead(f1..f4, x) -> seg logits (B, K, D, H, W), decoder features
         -> OrganRefiner (optional): each organ's box again at source
            resolution -> refined organ and lesion labels on the source grid
      -> MixerProjector(f3, f4) -> 24 image tokens ┐
      -> RegionTokens(decoder features, logits) -> 7 organ tokens ┤-> prefix
      -> SliceBranch (TG-IS, optional): 2D slices + 3D band, scored
         by the instruction -> slice_tokens tokens + relevance (B, D) ┘
      -> PlaneSliceFusion (PSAT, optional): the 31 tokens cross-attend to
         axial, coronal and sagittal slice views tagged with plane and position
      -> causal LM (transformers GPT-2, fed through ``inputs_embeds``):
         [prefix][<report> report text <eos>]  or  [prefix][<question> q <answer> a <eos>]

The language model is any ``transformers`` causal LM whose input embeddings
we can call: the default is a 2-layer GPT-2 of width 128 built from
:class:`NetConfig`, trained here with the word vocabulary of
:mod:`tomoscribe.model.text`; ``NetConfig.lm`` names a local checkpoint to
use instead (:mod:`tomoscribe.model.lm`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from tomoscribe.domain import Domain, get_domain
from tomoscribe.errors import ModelError
from tomoscribe.model.dcformer import DCFormerEncoder
from tomoscribe.model.lm import LMTokenizer, load_lm
from tomoscribe.model.projector import MixerProjector, RegionTokens
from tomoscribe.model.psat import PlaneSliceFusion
from tomoscribe.model.refine import OrganRefiner
from tomoscribe.model.seghead import SegHead
from tomoscribe.model.segtoken import SegTokenDecoder
from tomoscribe.model.siglip import AlignmentHead
from tomoscribe.model.text import VOCAB, vocabulary
from tomoscribe.model.tgis import SliceBranch, owned_lesion_area
from tomoscribe.model.vit3d import ViT3DEncoder


@dataclass
class NetConfig:
    """Hyper-parameters of :class:`ScribeNet` (saved as ``config.json``)."""

    model_shape: tuple[int, int, int] = (48, 96, 96)
    #: what the model reads (:mod:`tomoscribe.domain`): its structures, lesion
    #: kinds, report words and image intensities. Older model folders have
    #: none: the chest-abdomen CT. :meth:`for_domain` sets the classes and
    #: the vocabulary that go with it.
    domain: str = "ct-chest-abdomen"
    in_channels: int = 2
    #: the 3D encoder: "dcformer" (:mod:`tomoscribe.model.dcformer`, the
    #: default) or "vit" (:mod:`tomoscribe.model.vit3d`, the ablation's baseline
    #: of the same parameter count; ``depths`` and ``kernels`` are then unused)
    encoder: str = "dcformer"
    #: token width and layers of the "vit" encoder
    vit_width: int = 64
    vit_depth: int = 2
    channels: tuple[int, ...] = (16, 32, 64, 96)
    depths: tuple[int, ...] = (1, 1, 2, 1)
    kernels: tuple[int, ...] = (7, 7, 5, 3)
    num_classes: int = 9
    #: channels of the full-resolution head; must exceed num_classes (8 in the
    #: first shipped model was a bottleneck: two classes were never learned)
    head_channels: int = 16
    organ_classes: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7)
    lesion_class: int = 8
    width: int = 128
    lm_layers: int = 2
    lm_heads: int = 4
    max_positions: int = 96
    #: tokens of the TG-IS slice branch (0: none, the 3D-only model)
    slice_tokens: int = 0
    #: the slice branch also reads the area per slice of the lesions each organ
    #: owns (:func:`tomoscribe.model.tgis.owned_lesion_area`); off in configs
    #: written before it existed, on for a branch ``tomoscribe.train`` adds
    slice_owned: bool = False
    #: slices per plane of the PSAT fusion (0: none)
    psat_slices: int = 0
    #: width of the SigLIP image-report alignment head (0: none)
    align_dim: int = 0
    #: full-resolution channels of the organ-box refiner (0: none; see
    #: :mod:`tomoscribe.model.refine`); its levels have 1x, 2x and 3x this
    refine_width: int = 0
    #: the region tokens and the alignment head read the refiner's lesion
    #: statistics (ml, peak) in place of the coarse head's (needs a refiner;
    #: the language and align stages learn them)
    refine_stats: bool = False
    #: which lesions those statistics count for an organ: ``"rim"``, every
    #: lesion of the refiner's output within two voxels of the organ, per box
    #: (a kidney cyst that touches the liver counts for both); ``"owned"``,
    #: the lesion components the report assigns to the organ (ml, count), each
    #: component to one organ (:func:`tomoscribe.model.refine.owned_lesion_stats`)
    refine_stats_mode: str = "rim"
    #: flipped copies of each organ box the refiner also reads, its softmax
    #: averaged with the plain pass (test-time augmentation: 0 none, 1 left-right,
    #: 3 each axis, 7 every combination; see :data:`tomoscribe.model.refine.FLIP_SETS`)
    refine_flips: int = 0
    #: the refiner's lesion components whose mean lesion probability is under
    #: this are relabelled organ or other (0: every component is kept; see
    #: :func:`tomoscribe.model.refine.drop_weak_lesions`)
    refine_min_lesion_prob: float = 0.0
    #: a ``<seg>`` token and its mask decoder (referring segmentation, see
    #: :mod:`tomoscribe.model.segtoken`)
    seg_token: bool = False
    #: a local ``transformers`` causal LM folder used in place of the built-in
    #: GPT-2 (:mod:`tomoscribe.model.lm`): relative to the model folder (a
    #: saved model's is ``"lm"``) or absolute; ``width`` is its hidden size.
    #: Empty: the built-in GPT-2.
    lm: str = ""
    #: the report grammar's words: the built-in LM's vocabulary, and the
    #: alignment head's in every model
    vocab: tuple[str, ...] = field(default_factory=lambda: VOCAB)

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def for_domain(cls, domain: str | Domain) -> NetConfig:
        """The default configuration for ``domain``: its classes (background,
        structures, lesion) and its vocabulary."""
        dom = get_domain(domain)
        return cls(domain=dom.name, num_classes=dom.num_classes,
                   organ_classes=tuple(range(1, dom.lesion_label)), lesion_class=dom.lesion_label,
                   vocab=vocabulary(dom))

    @property
    def the_domain(self) -> Domain:
        """The :class:`~tomoscribe.domain.Domain` named by :attr:`domain`."""
        return get_domain(self.domain)

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> NetConfig:
        kw = dict(d)
        kw.setdefault("head_channels", 8)  # model folders written before the setting existed
        for key in ("model_shape", "channels", "depths", "kernels", "organ_classes", "vocab"):
            if key in kw:
                kw[key] = tuple(kw[key])  # type: ignore[arg-type]
        return cls(**kw)  # type: ignore[arg-type]


def build_lm(cfg: NetConfig) -> nn.Module:
    """The default causal LM: a small GPT-2 from ``transformers``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    conf = GPT2Config(
        vocab_size=len(cfg.vocab),
        n_positions=cfg.max_positions,
        n_embd=cfg.width,
        n_layer=cfg.lm_layers,
        n_head=cfg.lm_heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(conf)


def build_encoder(cfg: NetConfig) -> nn.Module:
    """The 3D encoder ``cfg.encoder`` names: stage features as a list, ``[(B, C_i, ...)]``."""
    if cfg.encoder == "dcformer":
        return DCFormerEncoder(cfg.in_channels, cfg.channels, cfg.depths, cfg.kernels)
    if cfg.encoder == "vit":
        return ViT3DEncoder(cfg.in_channels, cfg.channels, cfg.model_shape, cfg.vit_width,
                            cfg.vit_depth)
    raise ValueError(f"unknown encoder {cfg.encoder!r}; expected 'dcformer' or 'vit'")


class ScribeNet(nn.Module):
    """Encoder + segmentation head + projector + causal LM.

    Args:
        cfg: the hyper-parameters.
        lm_base: the folder a relative ``cfg.lm`` is read from (the model folder).

    Raises:
        ModelError: ``cfg.lm`` names no loadable causal LM, or one whose hidden
            size is not ``cfg.width``.
    """

    def __init__(self, cfg: NetConfig, lm_base: Path | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        #: the brought LM's tokenizer (``None``: the built-in GPT-2 and its word vocabulary)
        self.lm_tokenizer: LMTokenizer | None = None
        self.encoder = build_encoder(cfg)
        self.seg = SegHead(cfg.channels, cfg.num_classes, cfg.in_channels, cfg.head_channels)
        self.projector = MixerProjector(cfg.channels[-2], cfg.channels[-1], cfg.width)
        self.regions = RegionTokens(
            cfg.channels[0], list(cfg.organ_classes), cfg.lesion_class, cfg.width
        )
        if cfg.lm:
            path = Path(cfg.lm)
            if not path.is_absolute() and lm_base is not None:
                path = lm_base / path
            self.lm, self.lm_tokenizer = load_lm(path)
            dim = self.lm.get_input_embeddings().embedding_dim  # type: ignore[operator]
            if dim != cfg.width:
                raise ModelError(f"the language model in {path} is {dim} wide; the model's "
                                 f"projectors are {cfg.width}")
        else:
            self.lm = build_lm(cfg)
        self.slices: SliceBranch | None = None
        if cfg.slice_tokens:
            self.slices = SliceBranch(cfg.in_channels, cfg.channels[1], cfg.num_classes,
                                      cfg.model_shape[0], cfg.width, cfg.slice_tokens,
                                      owned=cfg.slice_owned)
        self.align: AlignmentHead | None = None
        if cfg.align_dim:
            self.align = AlignmentHead(cfg.channels[-2], cfg.channels[-1], 2 * cfg.channels[0] + 3,
                                       len(cfg.organ_classes), len(cfg.vocab), cfg.align_dim)
        self.refine: OrganRefiner | None = None
        if cfg.refine_width:
            w = cfg.refine_width
            self.refine = OrganRefiner((w, 2 * w, 3 * w))
        self.segtoken: SegTokenDecoder | None = None
        if cfg.seg_token:
            self.segtoken = SegTokenDecoder(cfg.width, cfg.channels[0], cfg.num_classes)
        self.psat: PlaneSliceFusion | None = None
        if cfg.psat_slices:
            self.psat = PlaneSliceFusion(
                cfg.width, cfg.psat_slices, in_channels=cfg.in_channels,
                encoder2d=self.slices.encoder2d if self.slices is not None else None)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What ``model.pt`` holds: the state dict less a brought LM's (saved in its folder)."""
        state = self.state_dict()
        if self.lm_tokenizer is None:
            return state
        return {k: v for k, v in state.items() if not k.startswith("lm.")}

    @property
    def num_image_tokens(self) -> int:
        """Length of the language model's image prefix (3D tokens + TG-IS tokens)."""
        return 24 + len(self.cfg.organ_classes) + self.cfg.slice_tokens

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image to ``(3D tokens (B, T, width), seg logits (B, K, D, H, W))``.

        The tokens are PSAT-fused when the network has PSAT; TG-IS tokens,
        which depend on the instruction, are not included (see
        :meth:`text_side_inputs`).
        """
        pooled, logits, (band, mass) = self.encode_full(x)
        tokens, _keys = self.text_side_inputs(x, pooled, band, mass)
        return tokens, logits

    def text_side_inputs(
        self, x: torch.Tensor, pooled: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
        band: torch.Tensor, mass: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Everything after the frozen vision side, before the instruction.

        Returns ``(3D tokens (B, T, width), TG-IS slice keys (B, D, width) or
        None)``: projector and region tokens (PSAT-fused with the plane views
        of ``x`` when the network has PSAT) and the slice branch's keys. The
        axial slices are encoded once and shared by TG-IS and PSAT.
        """
        tokens = self.tokens_from_pooled(pooled)
        axial = keys = None
        if self.slices is not None:
            axial = self.slices.encoder2d(x)
            keys = self.slices.keys_from(axial, band, mass)
        if self.psat is not None:
            tokens = self.psat(tokens, x, axial)
        return tokens, keys

    def encode_pooled(
        self, x: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]:
        """The vision side up to the projectors' parameter-free pooling.

        Returns ``((low (B, N_low, C3), high (B, N_high, C4), regions (B, organs,
        2 C0 + 3)), seg logits (B, K, D, H, W))``. Training the projectors and
        the language model on a frozen encoder caches these (they are small).
        """
        pooled, logits, _band = self.encode_full(x)
        return pooled, logits

    def encode_full(
        self, x: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor,
               tuple[torch.Tensor, torch.Tensor]]:
        """:meth:`encode_pooled` plus the slice branch's 3D inputs.

        Returns ``(pooled, seg logits, (band (B, C1, d), class mass (B, K, D)))``
        (see :meth:`SliceBranch.band`); with ``slice_owned`` the mass is
        ``(B, 2 K, D)``, the owned-lesion area below the class mass.
        """
        pooled, logits, band, _dec = self.encode_with_decoder(x)
        return pooled, logits, band

    def encode_with_decoder(
        self, x: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor,
               tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """:meth:`encode_full` plus the segmentation head's decoder features ``(B, C0, d, h, w)``
        (what the ``<seg>`` mask decoder reads)."""
        feats = self.encoder(x)
        logits, dec = self.seg(feats, x)
        low, high = self.projector.pool(feats[-2], feats[-1])
        band = SliceBranch.band(feats[1], logits)
        if self.cfg.slice_owned:
            area = owned_lesion_area(logits, self.cfg.lesion_class, self.cfg.organ_classes)
            band = (band[0], torch.cat([band[1], area], dim=1))
        return (low, high, self.regions.pool(dec, logits)), logits, band, dec

    def instruction_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Mean input embedding ``(B, width)`` of instruction ids ``(B, L)`` (pad 0 ignored)."""
        emb = self.embed_text(ids)
        keep = (ids != 0).unsqueeze(-1).to(emb.dtype)
        return (emb * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)

    def slice_tokens_for(self, keys: torch.Tensor, instruction_ids: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """TG-IS tokens ``(B, T, width)`` and relevance ``(B, D)`` for an instruction."""
        if self.slices is None:
            raise ValueError("this network has no slice branch (slice_tokens = 0)")
        return self.slices.select(keys, self.instruction_embedding(instruction_ids))

    def tokens_from_pooled(
        self, pooled: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    ) -> torch.Tensor:
        """Image tokens ``(B, T, width)`` from :meth:`encode_pooled`'s first output."""
        low, high, regions = pooled
        return torch.cat([self.projector.from_pooled(low, high),
                          self.regions.from_pooled(regions)], dim=1)

    def embed_text(self, ids: torch.Tensor) -> torch.Tensor:
        embedding: nn.Module = self.lm.get_input_embeddings()  # type: ignore[operator]
        emb: torch.Tensor = embedding(ids)
        return emb

    def lm_loss(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token loss on ``ids`` ``(B, L)`` (pad = 0) after the image prefix."""
        emb = torch.cat([tokens, self.embed_text(ids)], dim=1)
        logits = self.lm(inputs_embeds=emb).logits  # (B, T+L, V)
        t = tokens.shape[1]
        pred = logits[:, t - 1 : -1]  # position t-1 predicts ids[:, 0]
        return F.cross_entropy(
            pred.reshape(-1, pred.shape[-1]), ids.reshape(-1), ignore_index=0
        )

    def hidden_states(self, tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """The LM's last-layer hidden states ``(B, L, width)`` at the text positions.

        ``tokens`` ``(B, T, width)`` is the image prefix, ``ids`` ``(B, L)`` the text.
        """
        emb = torch.cat([tokens, self.embed_text(ids)], dim=1)
        out = self.lm(inputs_embeds=emb, output_hidden_states=True)
        hidden: torch.Tensor = out.hidden_states[-1][:, tokens.shape[1]:]
        return hidden

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, prompt: list[int], max_new: int = 40,
                 eos_id: int = 2, banned: tuple[int, ...] = ()) -> list[int]:
        """Greedy decoding after the image prefix and ``prompt`` (batch of one).

        Token ids in ``banned`` (task markers, padding) are never emitted.
        """
        ids = torch.tensor([prompt], dtype=torch.long)
        out: list[int] = []
        past = None
        emb = torch.cat([tokens, self.embed_text(ids)], dim=1)
        for _ in range(max_new):
            res = self.lm(inputs_embeds=emb, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].clone()
            if banned:
                logits[list(banned)] = float("-inf")
            nxt = int(logits.argmax())
            out.append(nxt)
            if nxt == eos_id:
                break
            if tokens.shape[1] + len(prompt) + len(out) >= self.cfg.max_positions:
                break
            emb = self.embed_text(torch.tensor([[nxt]], dtype=torch.long))
        return out
