"""``Scribe``: load a model folder, encode a volume, generate a :class:`Report`.

A model folder holds ``config.json`` (name, version, network settings) and
``model.pt`` (the state dict). The default model ships inside the package
(``tomoscribe/weights``); nothing is ever downloaded.

``generate`` turns the network's outputs into a report:

* the language model writes the report text from the image tokens; the text
  is parsed back into findings (:func:`tomoscribe.model.text.parse_findings`);
* the segmentation head's label map is put back on the source grid (or,
  with a refiner, organs and lesions are segmented again box by box at
  source resolution, :mod:`tomoscribe.model.refine`); lesion voxels are
  split into connected components, each assigned to the organ around it;
  the components of an organ the text names become that finding's segments,
  measured (longest in-plane diameter, volume) on the source grid;
* a finding is withheld where the segmentation shows no lesion in its organ
  (:meth:`Scribe.lesioned_organs`), and added where the text leaves out an
  organ in which the segmentation shows a lesion that stands out plainly on
  the image (:meth:`Scribe.second_look`);
* key slices are the source slices where a finding's segment is largest;
* each question is answered by the language model after the image tokens
  (and the TG-IS tokens for that question, where the model has the branch);
  its key images are the slices of what it names (:meth:`Scribe.key_slices_for`);
* a question the report's findings already answer (one of the templated
  questions about lesions: "is there a lesion in the liver ?", "how many
  lesions are in the spleen ?", "which organ has a lesion ?"..., or the same
  in other words: "does the liver have a lesion?",
  :data:`~tomoscribe.model.text.PARAPHRASES`) is answered from them, so that
  the answers never contradict the report; the language model is asked it
  in the templates' words, and where it answered otherwise, the answer says
  so (:meth:`Scribe.answer_from_report`).
"""

from __future__ import annotations

import ctypes
import json
import math
import sys
import threading
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from tomoscribe.errors import ModelError, OutOfScopeError
from tomoscribe.model.api import Encoded
from tomoscribe.model.lm import LMTokenizer
from tomoscribe.model.network import NetConfig, ScribeNet
from tomoscribe.model.preprocess import GridMap, labels_to_model_grid, prepare_volume
from tomoscribe.model.refine import (
    BODY_CLASS,
    refine,
    refined_organs,
    report_lesion_shells,
)
from tomoscribe.model.segtoken import (
    SEG,
    lesion_component_index,
    lesion_owners,
    shell_owner,
    snap_to_segmentation,
)
from tomoscribe.model.text import (
    ANSWER,
    BOS,
    PAD,
    QUESTION,
    REPORT,
    UNK,
    ParsedFinding,
    QuestionMatch,
    WordTokenizer,
    answer_from_findings,
    findings_to_text,
    flip_yes_no,
    impression_of,
    is_referring,
    match_question,
    parse_findings,
    sentence_case,
    with_closing_mark,
    with_findings,
    without_sites,
)
from tomoscribe.report import Answer, Finding, Report, Segment, named_organ
from tomoscribe.scope import DEFAULT_MODEL_DIR, ModelScope
from tomoscribe.volume import Volume

#: label of a lesion segment: 10 + index of the lesion in the report
LESION_LABEL_BASE = 10
#: how far the coarse segmentation's sizes may stray beyond the scope's ranges
#: (a factor each way) before a study is refused without the refiner
#: (:meth:`Scribe.coarse_refusal`)
EARLY_MARGIN = 1.5
#: how far the coarse segmentation's median values may stray beyond the
#: scope's ranges (a fraction of each range's width, each way) before a study
#: is refused without the refiner
EARLY_MEDIAN_MARGIN = 0.1
#: the shell, in voxels, on which a finding is grounded (:meth:`Scribe.lesioned_organs`).
#: The refiner often draws a one- or two-voxel rim of "body" between a lesion
#: and the organ around it (the partial-volume values between the two), so
#: that a 29 mm liver lesion's two-voxel shell was mostly body and its finding
#: was withheld. On 120 validation phantoms (``/tmp/s17/rules.py``, a one-off
#: script, 2026-11-24), grounded on the 2-, 3-, 4- and 6-voxel shells the
#: findings F1 was 0.959, 0.967, 0.970 and 0.967, with no normal study given a
#: false finding by any
GROUND_RING = 4


class Scribe:
    """A loaded model, ready to encode volumes and write reports."""

    def __init__(self, net: ScribeNet, name: str, version: str, model_dir: Path,
                 tokenizer: WordTokenizer | None = None,
                 scope: ModelScope | None = None) -> None:
        self.net = net.eval()
        self.cfg = net.cfg
        self.name = name
        self.version = version
        self.model_dir = model_dir
        #: what the model reads (config.json's ``scope``; empty: anything)
        self.scope = scope if scope is not None else ModelScope()
        #: the report grammar's word tokenizer (the alignment head's, and the
        #: built-in LM's)
        self.words = tokenizer if tokenizer is not None else WordTokenizer(self.cfg.vocab)
        #: the language model's tokenizer: a brought LM's own, else the words
        self.tok: WordTokenizer | LMTokenizer = (
            net.lm_tokenizer if net.lm_tokenizer is not None else self.words)
        #: what the model reads (:mod:`tomoscribe.domain`)
        self.domain = self.cfg.the_domain
        self.organ_names = {i + 1: n for i, n in enumerate(self.domain.structures)}
        # never emitted: padding, the start marker and the task markers
        self.banned = tuple(self.tok.index[t] for t in (PAD, BOS, UNK, REPORT, QUESTION, ANSWER)
                            if t in self.tok.index)
        # decoding budgets in the LM's tokens: 60 words for a report and 8 for
        # an answer, scaled by how many tokens a word takes (1 with the words)
        longest = findings_to_text([(o, k) for o, ks in self.domain.kinds.items() for k in ks
                                    for _ in range(2)], self.domain)
        ratio = len(self.tok.encode(longest)) / max(len(self.words.encode(longest)), 1)
        self.report_max_new = max(60, math.ceil(60 * ratio))
        self.answer_max_new = max(8, math.ceil(8 * ratio))

    def _question_mask(self, question: str, findings: list[Finding],
                       label_map: np.ndarray) -> np.ndarray:
        """Source voxels the segmentation says a question is about ``(D, H, W)`` bool.

        The question's organ (longest name found in it): its finding's lesion
        segment when the report has one, else the organ's segment; a question
        naming no organ: every lesion segment.
        """
        named = self._named_organ(question)
        if named is not None:
            hits = [f for f in findings if f.structure == named and f.segment is not None]
            if hits:
                return np.asarray(label_map == hits[0].segment)
            label = next(k for k, v in self.organ_names.items() if v == named)
            return np.asarray(label_map == label)
        return np.asarray(label_map >= LESION_LABEL_BASE)

    def _named_organ(self, question: str) -> str | None:
        """The organ a question names (:func:`tomoscribe.report.named_organ`), or ``None``."""
        return named_organ(question, self.organ_names.values())

    def _refined_components(self, encoded: Encoded) -> tuple[np.ndarray, dict[int, str]]:
        """Lesion components of the refined labels and their organs (computed once per volume).

        A component's organ is the organ that is most of its two-voxel shell,
        the body left out (:func:`~tomoscribe.model.refine.report_lesions`);
        a component that touches no organ has none and is not in the map.
        """
        comps, owners, _grounding = self._refined_ownership(encoded)
        return comps, owners

    def lesioned_organs(self, encoded: Encoded) -> set[str]:
        """The organs in which the refined segmentation shows a lesion (computed once).

        A lesion component is in the structure that is most of its
        :data:`GROUND_RING`-voxel shell, the body outline counted as one more
        structure: a component lying in the body beside the spleen is the
        body's, not the spleen's. (:meth:`_refined_components`, which gives
        the findings their segments, takes a two-voxel shell and leaves the
        body out, so that such a component still joins the segment of a
        finding the organ has.)
        """
        _comps, grounded = self.grounded_components(encoded)
        body = self.organ_names.get(BODY_CLASS)
        return {s for s in grounded.values() if s != body}

    def grounded_components(self, encoded: Encoded) -> tuple[np.ndarray, dict[int, str]]:
        """The refined lesion components and the structure each is grounded in (computed once).

        Returns ``(components (D, H, W) int32, {component: structure})``:
        the structure most of the component's :data:`GROUND_RING`-voxel
        shell belongs to, the body outline included (its name is the body's:
        a component lying in the body grounds no finding). A component with
        no labelled voxel around it is not in the map. The components are
        :meth:`_refined_components`' (the same labelling); error analysis
        (``benchmarks/misses.py``) reads them to tell why a finding was
        missed.
        """
        comps, _owners, grounded = self._refined_ownership(encoded)
        return comps, grounded

    def _refined_ownership(self, encoded: Encoded
                           ) -> tuple[np.ndarray, dict[int, str], dict[int, str]]:
        """Both ownership rules from one labelling of the refined lesions (cached).

        Returns ``(components (D, H, W) int32, {component: organ, two-voxel
        shell, body left out}, {component: structure, GROUND_RING-voxel
        shell, body counted})``.
        """
        cached = encoded.extra.get("refined_ownership")
        if cached is None:
            voxel_ml = float(np.prod(encoded.volume.spacing)) / 1000.0
            comps, shells = report_lesion_shells(encoded.extra["refined"], self.cfg.lesion_class,
                                                 list(self.organ_names), voxel_ml,
                                                 ring=GROUND_RING)
            owners: dict[int, str] = {}
            grounded: dict[int, str] = {}
            for c, counts in shells.items():
                organ = shell_owner(counts, slice(0, 2), exclude=(BODY_CLASS,))
                if organ is not None:
                    owners[c] = self.organ_names[organ]
                with_body = shell_owner(counts)
                if with_body is not None and with_body in self.organ_names:
                    grounded[c] = self.organ_names[with_body]
            cached = (comps, owners, grounded)
            encoded.extra["refined_ownership"] = cached
        found: tuple[np.ndarray, dict[int, str], dict[int, str]] = cached
        return found

    def second_look(self, encoded: Encoded, named: set[str]) -> list[tuple[str, str, int]]:
        """Lesions the text left out that the image shows plainly: ``(site, kind, component)``.

        ``component`` is the lesion's id in :meth:`grounded_components`; the
        finding added for the site takes it as its segment.

        A refined lesion component grounded in a site the text does not name
        (:meth:`grounded_components`) is added when it stands out from the
        organ around it by the domain's :attr:`~tomoscribe.domain.Domain.lesion_contrast`
        for the site's kind (:func:`lesion_contrast`): a nodule 4 standard
        deviations brighter than the lung next to it, a hypodense lesion or a
        cyst 1.5 darker than its organ. The language model reads each organ's
        lesion volume and count, not how the lesion looks, and leaves out
        some small true lesions along with the refiner's false ones; the
        false ones look like their organ. Measured with
        ``benchmarks/misses.py`` (2026-11-25, 0.8.0): on 120 validation
        phantoms the text left out 6 grounded sites, 2 with a lesion (both
        added) and 4 without (none added). Asked alone, the language model
        said yes to 1 of the 2 and to all 4, so its own answer is not the
        test. Sites holding several kinds, and models without a refiner, get
        no second look.
        """
        rule = self.domain.lesion_contrast
        if not rule or "refined" not in encoded.extra:
            return []
        _comps, grounded = self.grounded_components(encoded)
        out: list[tuple[str, str, int]] = []
        for c, site in sorted(grounded.items()):
            kind = self.domain.single_kind(site)
            if site in named or kind is None or kind not in rule:
                continue
            contrast = self.component_contrast(encoded, c, site)
            wanted = rule[kind]
            if contrast >= wanted if wanted > 0 else contrast <= wanted:
                out.append((site, kind, c))
        return out

    def component_contrast(self, encoded: Encoded, component: int, site: str) -> float:
        """:func:`lesion_contrast` of one :meth:`grounded_components` component against ``site``.

        Read in the component's bounding box grown by three voxels, which
        holds its two-voxel shell: the same figure as on the whole volume.
        """
        comps, _grounded = self.grounded_components(encoded)
        label = next(k for k, name in self.organ_names.items() if name == site)
        boxes = encoded.extra.get("component_boxes")
        if boxes is None:
            boxes = encoded.extra["component_boxes"] = ndimage.find_objects(comps)
        assert isinstance(boxes, list)
        found = boxes[component - 1] if component <= len(boxes) else None
        if found is None:
            return 0.0
        box = tuple(slice(max(b.start - 3, 0), b.stop + 3) for b in found)
        return lesion_contrast(encoded.volume.voxels[box], comps[box] == component,
                               encoded.extra["refined"][box] == label)

    def key_slices_for(self, question: str, findings: list[Finding], label_map: np.ndarray,
                       relevance: np.ndarray | None, grid: GridMap) -> tuple[int, ...]:
        """The key images of an answer: source slice indices, most relevant first.

        With a TG-IS branch, its relevance ranks the slices; where the
        segmentation shows what the question is about, only those slices
        compete (the branch reads a 48-slice grid, the segmentation the
        source slices). Without a branch (or for a non-axial series), the
        slices where the segmentation's structure is largest.
        """
        mask = self._question_mask(question, findings, label_map)
        area = mask.sum(axis=(1, 2)).astype(np.float64)
        src = source_slice_relevance(relevance, grid) if relevance is not None else None
        if src is None or relevance is None:
            return tuple(_key_slices(mask)) if area.any() else ()
        if not area.any():  # nothing segmented: where the branch looked
            return tuple(relevant_source_slices(relevance, grid))
        # within the structure, the most relevant slices; ties: the larger area
        score = np.where(area > 0, src + 1e-9 * area / area.max(), -1.0)
        return tuple(int(k) for k in np.argsort(-score, kind="stable")[:3] if area[k] > 0)

    # ------------------------------------------------------------------ load
    @classmethod
    def load(cls, model_dir: Path | str | None = None) -> Scribe:
        """Load a model folder (``None``: the default model shipped with tomoscribe).

        Raises:
            ModelError: the folder is missing, incomplete or does not match.
        """
        folder = Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR
        conf_path, weights = folder / "config.json", folder / "model.pt"
        if not conf_path.is_file() or not weights.is_file():
            raise ModelError(f"model folder {folder} lacks config.json or model.pt")
        try:
            conf = json.loads(conf_path.read_text())
            cfg = NetConfig.from_dict(conf["net"])
            net = ScribeNet(cfg, lm_base=folder)
            state = torch.load(weights, map_location="cpu", weights_only=True)
            missing, unexpected = net.load_state_dict(
                {k: v.float() if v.is_floating_point() else v for k, v in state.items()},
                strict=False)
            # a brought LM's weights are in its own folder (cfg.lm), not in model.pt
            missing = [k for k in missing if not (cfg.lm and k.startswith("lm."))]
            if missing or unexpected:
                raise ValueError(f"model.pt does not fit config.json: "
                                 f"missing {missing[:3]}, unexpected {unexpected[:3]}")
            tok_path = folder / "tokenizer.json"
            tok = WordTokenizer.from_file(tok_path) if tok_path.is_file() else None
            scope = ModelScope.from_dict(conf.get("scope"))
        except Exception as exc:  # anything a foreign folder can throw: one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelError(f"cannot load model from {folder}: {first[:200]}") from exc
        if tok is not None and tok.vocab != cfg.vocab:
            raise ModelError(f"model folder {folder}: tokenizer.json does not match the "
                             "vocabulary in config.json")
        return cls(net, str(conf.get("name", "tomoscribe")), str(conf.get("version", "0")), folder,
                   tok, scope)

    # ----------------------------------------------------------------- scope
    @staticmethod
    def anatomy_found(report: Report, volume: Volume) -> dict[str, tuple[float, float]]:
        """Each organ segment of ``report``: ``structure -> (ml, median voxel value)``."""
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        found: dict[str, tuple[float, float]] = {}
        for seg in report.segments:
            if seg.kind != "organ":
                continue
            mask = report.label_map == seg.label
            n = int(mask.sum())
            if n:
                found[seg.structure] = (n * voxel_ml, float(np.median(volume.voxels[mask])))
        return found

    def check_anatomy(self, report: Report, volume: Volume) -> None:
        """Refuse a report on an image the model was not trained to read.

        The scope's image check (:meth:`ModelScope.anatomy_refusal`) on what
        the model segmented: a head CT that passed the header checks (no Body
        Part Examined) is caught here.

        Raises:
            OutOfScopeError: the one-line reason.
        """
        why = self.scope.anatomy_refusal(self.anatomy_found(report, volume))
        if why is not None:
            raise OutOfScopeError(why)

    @staticmethod
    def coarse_voxel_ml(grid: GridMap, spacing: tuple[float, float, float]) -> float:
        """The volume of one model-grid voxel in ml: the crop's extent over the model shape.

        Args:
            grid: how the model grid maps to the source.
            spacing: the source voxel size (mm) along the source array's axes.
        """
        mm = [spacing[grid.perm[a]] * (grid.stop[a] - grid.start[a]) / grid.model_shape[a]
              for a in range(3)]
        return float(np.prod(mm)) / 1000.0

    def coarse_refusal(self, logits: torch.Tensor, grid: GridMap,
                       spacing: tuple[float, float, float], voxels: np.ndarray) -> str | None:
        """The scope's image check on the coarse segmentation, before the refiner runs.

        Refusing a study the model does not read need not wait for the
        refiner, which reads every structure's box at source resolution (a
        torso sent to the head model: litre-sized "hemisphere" boxes; 0.40 s
        refused here against 2.94 s read to the end, ``benchmarks/scope.py``).
        The check is the full one (:meth:`check_anatomy`, which still runs on
        the report) made lenient, so that a study the refined check would pass
        is not refused early:

        - sizes: the volume ranges and what counts as found (``min_ml``) are
          widened by :data:`EARLY_MARGIN` each way (on six test heads the
          coarse sizes were within 10% of the refined ones);
        - medians: each range is widened by :data:`EARLY_MEDIAN_MARGIN` of its
          width each way, and only structures of ``min_ml`` times
          :data:`EARLY_MARGIN` or more are checked. The median is of the
          source voxels nearest each model-grid voxel (on eight validation
          chest-abdomen CTs the coarse medians were within 2 HU of the refined
          ones; on eight head CTs the coarse "liver" and "spleen" lay in bone,
          about 890 HU).

        Args:
            logits: ``(1, K, D, H, W)`` on the model grid.
            grid: how the model grid maps to the source.
            spacing: the source voxel size (mm) along the source array's axes.
            voxels: ``(D, H, W)`` the source voxels (for the medians).

        Returns:
            The one-line reason, quoting the declared ranges, or ``None`` (also
            when the scope declares no image check).
        """
        scope = self.scope
        if not (scope.volumes or scope.anatomy):
            return None
        voxel_ml = self.coarse_voxel_ml(grid, spacing)
        labels = logits.argmax(dim=1)[0].numpy()
        counts = np.bincount(labels.ravel(), minlength=logits.shape[1])
        sizes = {name: (float(counts[label]) * voxel_ml, 0.0)
                 for label, name in self.organ_names.items()}
        widened = replace(
            scope, anatomy=(), min_ml=scope.min_ml / EARLY_MARGIN,
            volumes=tuple((name, lo / EARLY_MARGIN, hi * EARLY_MARGIN)
                          for name, lo, hi in scope.volumes))
        if widened.anatomy_refusal(sizes) is not None:
            # the reason quotes the declared ranges, not the widened ones
            return replace(scope, anatomy=()).anatomy_refusal(sizes)
        checked = {label: name for label, name in self.organ_names.items()
                   if name in {n for n, _lo, _hi in scope.anatomy}
                   and sizes[name][0] >= scope.min_ml * EARLY_MARGIN}
        if not checked:
            return None
        values = labels_to_model_grid(voxels, grid)  # (D, H, W) on the model grid
        found = {name: (sizes[name][0], float(np.median(values[labels == label])))
                 for label, name in checked.items()}
        widened = replace(
            scope, volumes=(), min_ml=0.0,
            anatomy=tuple((name, lo - EARLY_MEDIAN_MARGIN * (hi - lo),
                           hi + EARLY_MEDIAN_MARGIN * (hi - lo))
                          for name, lo, hi in scope.anatomy))
        if widened.anatomy_refusal(found) is None:
            return None
        return replace(scope, volumes=(), min_ml=0.0).anatomy_refusal(found)

    # ---------------------------------------------------------------- encode
    @torch.inference_mode()
    def encode(self, volume: Volume, *, early_refusal: bool = True) -> Encoded:
        """Run the image side of the model.

        Args:
            volume: the series.
            early_refusal: refuse, before the refiner, a study whose coarse
                segmentation is far outside the scope (:meth:`coarse_refusal`);
                ``False`` reads every study to the end (the benchmarks score
                every study, and count what an out-of-scope one would have
                reported).

        Returns:
            An :class:`Encoded` with ``image_tokens`` ``(1, T, width)``,
            ``seg_logits`` ``(1, K, D, H, W)`` on the model grid and
            ``slice_features`` ``(1, D, K)`` (class probability mass per model
            slice).

        Raises:
            OutOfScopeError: the coarse segmentation is far outside the
                scope's size or value ranges (:meth:`coarse_refusal`; models
                with a refiner only, whose work it saves).
        """
        x, grid = prepare_volume(volume, self.cfg.model_shape, self.domain.intensity)
        pooled, logits, (band, mass), dec = self.net.encode_with_decoder(x)
        extra: dict[str, object] = {"grid": grid}
        if self.net.segtoken is not None:  # what the <seg> mask decoder reads
            extra["voxel_features"] = self.net.segtoken.voxel_features(dec, logits)
        token_pooled = pooled
        if self.net.refine is not None:
            why = (self.coarse_refusal(logits, grid, volume.spacing, volume.voxels)
                   if early_refusal else None)
            if why is not None:
                raise OutOfScopeError(why)
            refined = refine(self.net.refine, volume.voxels, volume.spacing, grid, logits,
                             refined_organs(self.cfg.organ_classes), self.cfg.lesion_class,
                             self.cfg.refine_flips, self.cfg.refine_stats_mode,
                             self.cfg.refine_min_lesion_prob)
            extra["refined"] = refined.labels  # (D, H, W) uint8 on the source grid
            extra["refined_stats"] = refined.stats
            if self.cfg.refine_stats:
                low, high, regions = pooled
                token_pooled = (low, high, refined.region_stats(regions, self.cfg.organ_classes))
        tokens, keys = self.net.text_side_inputs(x, token_pooled, band, mass)
        prob = logits.softmax(dim=1)
        slice_features = prob.sum(dim=(3, 4)).transpose(1, 2)
        if keys is not None:
            extra["slice_keys"] = keys  # (1, D, width)
        if self.net.align is not None:
            extra["pooled"] = token_pooled  # for image_embedding
        trim_heap()  # the refiner's boxes are freed: give their memory back
        return Encoded(volume, tokens, logits, slice_features, extra=extra)

    @torch.inference_mode()
    def image_embedding(self, encoded: Encoded) -> np.ndarray:
        """Unit image embedding ``(dim,)`` of the SigLIP head (image-report retrieval).

        Raises:
            ModelError: the model has no alignment head.
        """
        if self.net.align is None or "pooled" not in encoded.extra:
            raise ModelError(f"model {self.name} {self.version} has no image-report alignment head")
        low, high, regions = encoded.extra["pooled"]
        return self.net.align.embed_image(low, high, regions)[0].numpy()

    @torch.inference_mode()
    def report_embedding(self, text: str) -> np.ndarray:
        """Unit embedding ``(dim,)`` of a report text, in the image embeddings' space.

        Raises:
            ModelError: the model has no alignment head.
        """
        if self.net.align is None:
            raise ModelError(f"model {self.name} {self.version} has no image-report alignment head")
        ids = torch.tensor([self.words.encode(text) or [self.words.unk_id]], dtype=torch.long)
        return self.net.align.embed_text(ids)[0].numpy()

    @torch.inference_mode()
    def prefix(self, encoded: Encoded, instruction: list[int], *, blind: bool = False
               ) -> tuple[torch.Tensor, np.ndarray | None]:
        """The language model's prefix for one instruction, and the TG-IS relevance.

        Returns ``(tokens (1, T, width), relevance (D,) on the model grid)``;
        the relevance is ``None`` for a model without a slice branch. With
        ``blind``, every image-derived input is zeroed (the image-blind
        baseline): the tokens then depend on the instruction only.
        """
        tokens = encoded.image_tokens
        keys = encoded.extra.get("slice_keys")
        if blind:
            tokens = torch.zeros_like(tokens)
            keys = torch.zeros_like(keys) if keys is not None else None
        if keys is None:
            return tokens, None
        ids = torch.tensor([instruction or [self.tok.unk_id]], dtype=torch.long)
        slice_tokens, relevance = self.net.slice_tokens_for(keys, ids)
        return torch.cat([tokens, slice_tokens], dim=1), relevance[0].numpy()

    def ask(self, encoded: Encoded, question: str, *, blind: bool = False
            ) -> tuple[str, np.ndarray | None]:
        """Answer ``question``: ``(answer text, TG-IS relevance (D,) or None)``.

        The relevance is on the model grid (``None`` for a model without a
        slice branch); :meth:`key_slices_for` turns it into key images. A
        question without its closing mark gets one (:func:`with_closing_mark`).
        """
        question = with_closing_mark(question)
        tokens, relevance = self.prefix(encoded, self.tok.encode(question), blind=blind)
        return self.answer(tokens, question), relevance

    # -------------------------------------------------------------- generate
    @torch.inference_mode()
    def write_text(self, tokens: torch.Tensor) -> str:
        """The report text (model grammar) from image tokens ``(1, T, width)``."""
        ids = self.net.generate(tokens, [self.tok.index[REPORT]], max_new=self.report_max_new,
                                eos_id=self.tok.eos_id, banned=self.banned)
        return self.tok.decode(ids)

    def question_prompt(self, question: str, prefix_len: int) -> list[int]:
        """``<question> ... <answer>`` ids, cut from the left to fit after ``prefix_len`` tokens.

        Encoded as one string: a subword tokenizer encodes a word after a
        space (as in training) differently from the same word alone.
        """
        prompt = self.tok.encode(f"{QUESTION} {question} {ANSWER}")
        room = self.cfg.max_positions - prefix_len - self.answer_max_new
        return prompt[-room:] if len(prompt) > room else prompt

    @torch.inference_mode()
    def answer(self, tokens: torch.Tensor, question: str) -> str:
        """Answer one question from image tokens ``(1, T, width)``."""
        prompt = self.question_prompt(question, tokens.shape[1])
        ids = self.net.generate(tokens, prompt, max_new=self.answer_max_new,
                                eos_id=self.tok.eos_id, banned=self.banned)
        return self.tok.decode(ids)

    @torch.inference_mode()
    def refer(self, encoded: Encoded, question: str, *, blind: bool = False,
              snap: bool = True) -> tuple[str, np.ndarray | None]:
        """Answer ``question``; where the answer is ``<seg>``, also the mask it asks for.

        Returns ``(answer text, mask)``: the mask is ``(D, H, W)`` bool on the
        source grid (see :mod:`tomoscribe.model.segtoken`), ``None`` when the
        model has no mask decoder or did not answer ``<seg>``. With ``snap``
        and a refiner, the mask is made of the refined regions the decoder's
        mask mostly covers (:func:`~tomoscribe.model.segtoken.snap_to_segmentation`),
        within the organ the question names (:meth:`_within_named_organ`).
        Asked for lesions (:meth:`~tomoscribe.domain.Domain.asks_for_lesions`),
        where the decoder's mask covers none of the
        segmentation's (small lesions are a voxel deep on the model grid),
        the mask is the lesion components the report gives that organ (every
        organ, when none is named): on 60 validation phantoms, 10 of 11
        questions for an organ's lesions that got no mask had answered
        ``<seg>`` and had the lesion segmented there (``/tmp/s17/refer_miss.py``,
        a one-off script, 2026-11-24). When nothing is left the answer is
        ``none .`` without a mask. A question without its closing mark gets
        one (:func:`with_closing_mark`).
        """
        question = with_closing_mark(question)
        tokens, _relevance = self.prefix(encoded, self.tok.encode(question), blind=blind)
        prompt = self.question_prompt(question, tokens.shape[1])
        ids = self.net.generate(tokens, prompt, max_new=self.answer_max_new,
                                eos_id=self.tok.eos_id, banned=self.banned)
        text = self.tok.decode(ids)
        decoder = self.net.segtoken
        seg_id = self.tok.index.get(SEG)
        if decoder is None or seg_id is None or seg_id not in ids:
            return text, None
        seq = torch.tensor([prompt + ids[: ids.index(seg_id) + 1]], dtype=torch.long)
        hidden = self.net.hidden_states(tokens, seq)[:, -1]  # at the <seg> input position
        feats = encoded.extra["voxel_features"]
        if blind:
            feats = torch.zeros_like(feats)
        logits = decoder(hidden, feats)[0]
        grid: GridMap = encoded.extra["grid"]
        mask = np.asarray(grid.to_source_labels((logits > 0).to(torch.uint8).numpy()) > 0)
        refined = encoded.extra.get("refined")
        if snap and refined is not None and not blind:
            organs = [c for c in self.cfg.organ_classes if c != BODY_CLASS]
            index = encoded.extra.get("snap_components")
            if index is None:  # once per volume, whatever the number of questions
                index = lesion_component_index(refined, self.cfg.lesion_class)
                encoded.extra["snap_components"] = index
            snapped = snap_to_segmentation(mask, refined, organs, self.cfg.lesion_class,
                                           components=index)
            snapped = self._within_named_organ(question, snapped, encoded)
            if not snapped.any() and self.domain.asks_for_lesions(question):
                # the model answered <seg>, but the decoder's coarse mask missed
                # the segmentation's lesions (a 10 mm lesion is one voxel deep
                # on the model grid): the lesions the question asks for are
                # then those the report would name where it says
                comps, owner = self._refined_components(encoded)
                snapped = self._within_named_organ(
                    question, np.isin(comps, list(owner)), encoded)
            if not snapped.any():  # nothing of that kind where the question says
                return "none .", None
            mask = snapped
        return text, mask

    def answer_from_report(self, match: QuestionMatch, findings: Sequence[ParsedFinding]
                           ) -> str:
        """The answer the report gives a trained question, for the SR.

        The trained questions about lesions, in any wording
        (:func:`tomoscribe.model.text.match_question`), are questions the
        findings settle ("is the liver normal ?": no, the report names a liver
        lesion). ``findings`` are the report's, after grounding.

        Why not the language model's own answer: asked alone it can contradict
        the report it wrote (on normal validation phantoms, "yes" to "is
        there a lesion in the left kidney ?" under a report with no finding).
        Accuracy is about level (``benchmarks/accuracy.py`` scores both;
        0.8.0, 2026-11-25): on 120 validation phantoms the closed questions
        were right in 0.989 of cases answered from the report against 0.976
        answered alone, and "which organ has a lesion ?" in 0.942 against
        0.892; on 200 test phantoms 0.989 against 0.991, and 0.945 against
        0.950 (organs the report leaves out and the model, asked, names).
        """
        return sentence_case(answer_from_findings(match, findings, self.domain))

    def _within_named_organ(self, question: str, mask: np.ndarray, encoded: Encoded
                            ) -> np.ndarray:
        """A snapped mask restricted to the organ the question names, with that organ's lesions.

        The decoder reads per-voxel features: asked for the lesions of a
        lung, it could mark a liver lesion (the sample study did). A lesion
        component is kept only when the organ around it (as the report
        assigns lesions to organs) is the one named; a question naming no
        organ keeps every lesion.
        """
        named = self._named_organ(question)
        if named is None:
            return mask
        comps, owner = self._refined_components(encoded)
        mine = np.isin(comps, [c for c, o in owner.items() if o == named])
        organ = next(k for k, v in self.organ_names.items() if v == named)
        return np.asarray(mask & (mine | (encoded.extra["refined"] == organ)))

    def generate(self, encoded: Encoded, questions: Sequence[str] = (), *,
                 blind: bool = False) -> Report:
        """Write the report for an encoded volume.

        The language model writes the text; a finding it writes for an organ
        in which the segmentation shows no lesion is withheld
        (:attr:`Report.withheld`), so that every finding reported has a lesion
        segment. On 120 validation phantoms (one-off counts, 2026-11-24)
        this withheld 10 false findings and 2 true ones of 0.8.0 (grounded
        on a two-voxel shell, 9 and 4; see :data:`GROUND_RING`), and 5 and 4
        of 0.7.0 on the two-voxel shell. A site the text leaves out in which
        the segmentation shows a lesion that stands out on the image gets a
        finding (:meth:`second_look`, :attr:`Report.added`).

        Args:
            encoded: from :meth:`encode`.
            questions: free-text questions to answer.
            blind: zero the image tokens (the image-blind baseline).
        """
        volume = encoded.volume
        grid: GridMap = encoded.extra["grid"]
        tokens, relevance = self.prefix(encoded, [self.tok.index[REPORT]], blind=blind)
        text = self.write_text(tokens)
        parsed = parse_findings(text, self.domain)

        lesion_class = self.cfg.lesion_class
        voxel_ml = float(np.prod(volume.spacing)) / 1000.0
        refined = encoded.extra.get("refined")
        if refined is not None:  # the refiner's labels, already on the source grid
            comp_src, comp_organ = self._refined_components(encoded)
            organ_src = refined.copy()
        else:
            labels_model = encoded.seg_logits.argmax(dim=1)[0].to(torch.uint8).numpy()
            comps, comp_organ = _lesion_components(labels_model, lesion_class, self.organ_names)
            comp_src = grid.to_source_labels(comps.astype(np.int16))
            organ_src = grid.to_source_labels(labels_model)
        organ_src[organ_src == lesion_class] = 0
        organ_src[organ_src == BODY_CLASS] = 0  # the body outline is no segment of interest
        label_map = organ_src.astype(np.uint8)

        segments: list[Segment] = [
            Segment(label, name, name, "organ")
            for label, name in self.organ_names.items()
            if label != BODY_CLASS and bool((label_map == label).any())
        ]
        # a finding is reported where the segmentation shows a lesion in its
        # organ; the language model's other findings are withheld (not for the
        # image-blind baseline, which must not see the image through them)
        if refined is not None:
            lesioned = self.lesioned_organs(encoded)
        else:
            voxels_of = np.bincount(comp_src.ravel(), minlength=max(comp_organ, default=0) + 1)
            lesioned = {organ for c, organ in comp_organ.items() if voxels_of[c]}
        withheld = [] if blind else [pf for pf in parsed if pf.organ not in lesioned]
        if withheld:
            text = without_sites(text, [pf.organ for pf in withheld], self.domain)
            parsed = [pf for pf in parsed if pf.organ in lesioned]
        # the text is a report in the model grammar: findings, or the normal
        # study's sentence (a brought language model not yet trained may
        # write neither: its text is left as it is, and its questions are
        # its own to answer)
        reads_back = bool(parsed) or (
            WordTokenizer.words(text) == WordTokenizer.words(findings_to_text([], self.domain)))
        # lesions the text left out that stand out on the image (not for the
        # image-blind baseline either)
        named = {pf.organ for pf in parsed}
        more = self.second_look(encoded, named) if reads_back and not blind else []
        if more:
            text = with_findings(text, [(site, kind) for site, kind, _c in more], self.domain)
            parsed = parse_findings(text, self.domain)
        # an added finding's segment is the lesion it was added for (whose
        # two-voxel shell, the body left out, may be another organ's)
        evidence: dict[str, list[int]] = {}
        for site, _kind, c in more:
            evidence.setdefault(site, []).append(c)
        taken = {c for _site, _kind, c in more}
        added = [sentence_case(pf.sentence) for pf in parsed if pf.organ not in named]
        findings: list[Finding] = []
        next_label = LESION_LABEL_BASE
        for pf in parsed:
            ids = evidence.get(pf.organ, []) + [
                c for c, organ in comp_organ.items() if organ == pf.organ and c not in taken]
            masks = [(c, comp_src == c) for c in ids]
            masks = [(c, m) for c, m in masks if m.any()]
            masks.sort(key=lambda cm: -int(cm[1].sum()))
            seg_label: int | None = None
            size_mm: float | None = None
            volume_ml: float | None = None
            if masks:
                seg_label = next_label
                next_label += 1
                union = np.zeros(label_map.shape, dtype=bool)
                for _c, m in masks:
                    union |= m
                label_map[union] = seg_label
                # a finding naming two kinds (a mass and a cyst) has one segment
                # of "lesions", coded as a lesion of no stated kind
                one_kind = pf.kinds[0] if len(pf.kinds) == 1 else None
                name = f"{pf.organ} {pf.kind}" if len(pf.kinds) <= 1 else f"{pf.organ} lesions"
                segments.append(Segment(seg_label, name, pf.organ, "lesion", one_kind))
                key = _key_slices(union)
                size_mm = _longest_diameter(masks[0][1], key[0], volume.spacing)
                volume_ml = round(float(union.sum()) * voxel_ml, 2)
            else:
                organ_label = next(k for k, v in self.organ_names.items() if v == pf.organ)
                organ_mask = label_map == organ_label
                key = _key_slices(organ_mask) if organ_mask.any() else [volume.shape[0] // 2]
            sentence = sentence_case(pf.sentence)
            if size_mm is not None:
                sentence = sentence[:-1] + f", largest {size_mm:.0f} mm on the segmentation."
            findings.append(Finding(sentence, pf.organ, key, seg_label, size_mm, volume_ml))

        # lesion voxels of organs the report does not mention stay unlabelled:
        # the text is the model's decision, the segmentation shows its extent

        lesion_area = (label_map >= LESION_LABEL_BASE).sum(axis=(1, 2)).astype(np.float32)
        source_relevance = (source_slice_relevance(relevance, grid)
                            if relevance is not None else None)
        if source_relevance is not None and source_relevance.sum() > 0:
            scores = source_relevance / source_relevance.sum()  # where the report looked
        elif lesion_area.sum() > 0:
            scores = lesion_area / lesion_area.sum()
        else:
            scores = np.full(volume.shape[0], 1.0 / volume.shape[0], dtype=np.float32)

        answers = []
        for q in questions:
            referring = self.net.segtoken is not None and is_referring(q)
            # a trained question typed in other words is asked in the template's
            matched = match_question(q, self.domain, referring=referring)
            asked = matched.question if matched is not None else q
            if referring:
                ans, mask = self.refer(encoded, asked, blind=blind)
                if mask is not None:  # the model answered <seg>: the mask is the answer
                    shown = (f"Segmented: {float(mask.sum()) * voxel_ml:.1f} ml."
                             if mask.any() else "Segmented, but the mask is empty.")
                    answers.append(Answer(q, shown, tuple(_key_slices(mask)) if mask.any()
                                          else (), mask))
                    continue
                _tokens, q_relevance = self.prefix(
                    encoded, self.tok.encode(with_closing_mark(asked)), blind=blind)
            else:
                ans, q_relevance = self.ask(encoded, asked, blind=blind)
                if matched is not None and matched.negated:  # "is the study normal ?"
                    ans = flip_yes_no(ans)
            key_slices = self.key_slices_for(q, findings, label_map, q_relevance, grid)
            text_ans = sentence_case(ans.replace(SEG, " ").strip())
            if matched is not None and not referring and reads_back:
                from_report = self.answer_from_report(matched, parsed)
                answers.append(Answer(q, _with_model_answer(from_report, text_ans),
                                      key_slices, model_answer=text_ans or "(no answer)"))
                continue
            answers.append(Answer(q, text_ans or "(no answer)", key_slices))

        impression = sentence_case(impression_of(text)) or "No impression generated."
        return Report(
            findings=findings,
            impression=impression,
            text=sentence_case(text),
            answers=answers,
            slice_scores=scores.astype(np.float32),
            label_map=label_map,
            segments=sorted(segments, key=lambda s: s.label),
            model_name=self.name,
            model_version=self.version,
            reads=self.domain.series_label,
            withheld=[sentence_case(pf.sentence) for pf in withheld],
            added=added,
        )


def _with_model_answer(answer: str, model_answer: str) -> str:
    """``answer`` (from the report), with what the model answered alone where it differs."""
    def words(text: str) -> list[str]:
        return [w for w in WordTokenizer.words(text) if w != "."]

    if words(model_answer) == words(answer):
        return answer
    shown = model_answer.rstrip(". ") or "nothing"
    return (f"{answer}. (Asked this alone, the model answered: {shown.lower()}; "
            "this answer follows the report's findings.)")


def source_slice_relevance(relevance: np.ndarray, grid: GridMap) -> np.ndarray | None:
    """Model-slice relevance ``(D_model,)`` spread over the source slices, or ``None``.

    Only when the source slices are the model's axial slices (source axis 0
    is the canonical z axis); each source slice gets the relevance of the
    model slice it falls in.
    """
    if grid.perm[0] != 0:
        return None
    index = grid.model_index_for_canonical(0)  # canonical slice -> model slice or -1
    out = np.where(index >= 0, relevance[np.clip(index, 0, None)], 0.0).astype(np.float32)
    return out[::-1].copy() if grid.flip[0] else out


def relevant_source_slices(relevance: np.ndarray, grid: GridMap, n: int = 3) -> list[int]:
    """The source slices at the centre of the ``n`` most relevant model slices.

    Empty when the source slices are not the model's axial slices.
    """
    if grid.perm[0] != 0:
        return []
    index = grid.model_index_for_canonical(0)
    size = index.shape[0]
    out: list[int] = []
    for k in np.argsort(-relevance, kind="stable"):
        canonical = np.nonzero(index == k)[0]
        if canonical.size:
            centre = int(canonical[canonical.size // 2])
            out.append(size - 1 - centre if grid.flip[0] else centre)
        if len(out) == n:
            break
    return out


def lesion_contrast(image: np.ndarray, lesion: np.ndarray, organ: np.ndarray) -> float:
    """How far a lesion stands out from its organ, in standard deviations of the organ next to it.

    ``(mean of image over lesion - mean over the shell) / std of the shell``,
    the shell being the voxels within two steps (six-connected) of the
    lesion that ``organ`` marks (all of them where fewer than 3 are the
    organ's); the standard deviation is never taken under 1 (a CT's
    Hounsfield unit). Positive: brighter than the organ. Arrays ``(D, H,
    W)``: ``image`` float, ``lesion`` and ``organ`` bool.
    """
    shell = ndimage.binary_dilation(lesion, iterations=2) & ~lesion
    near = shell & organ
    if int(near.sum()) < 3:
        near = shell
    if not near.any() or not lesion.any():
        return 0.0
    ring = image[near].astype(np.float64)
    return float((image[lesion].mean() - ring.mean()) / max(float(ring.std()), 1.0))


def _lesion_components(
    labels: np.ndarray, lesion_class: int, organ_names: dict[int, str], min_voxels: int = 2
) -> tuple[np.ndarray, dict[int, str]]:
    """Connected lesion components of a label array and the organ around each (by name).

    Components under ``min_voxels`` (noise: a single voxel on the model grid)
    and components with no organ within two voxels are dropped
    (:func:`~tomoscribe.model.segtoken.lesion_owners`).
    """
    organs = [c for c in organ_names if c != BODY_CLASS]
    comps, owners = lesion_owners(labels, lesion_class, organs, ring=2, min_voxels=min_voxels)
    return comps, {c: organ_names[o] for c, o in owners.items()}


def _key_slices(mask: np.ndarray, n: int = 3) -> list[int]:
    """Source slice indices with the largest area of ``mask`` ``(D, H, W)``."""
    area = mask.sum(axis=(1, 2))
    order = np.argsort(-area, kind="stable")
    return [int(k) for k in order[:n] if area[k] > 0] or [int(order[0])]


def _longest_diameter(mask: np.ndarray, k: int, spacing: tuple[float, float, float]) -> float:
    """Longest in-plane distance (mm) between two voxels of ``mask[k]``."""
    rr, cc = np.nonzero(mask[k])
    if rr.size == 0:
        return 0.0
    pts = np.stack([rr * spacing[1], cc * spacing[2]], axis=1)
    if len(pts) > 400:
        pts = pts[np.linspace(0, len(pts) - 1, 400).astype(int)]
    d = np.sqrt(((pts[:, None, :] - pts[None, :, :]) ** 2).sum(-1)).max()
    return float(d + min(spacing[1], spacing[2]))  # voxel extent, not centre distance


_CACHE: dict[Path, Scribe] = {}
_LOCK = threading.Lock()


def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc (it has ``malloc_trim``), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # musl and others
        return None
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def trim_heap() -> None:
    """Give the heap's free memory back to the system (glibc only; a no-op elsewhere).

    glibc serves a block above its mmap threshold with a mapping of its own,
    unmapped on free, but raises the threshold (up to 32 MB) each time such
    a block is freed; after that, tensors of a few MB (the refiner's organ
    boxes, a different size in every study) come from the heap, which keeps
    the freed memory. A worker's resident memory grew by 50-100 MB per study
    (1.24 GiB after 12 phantom studies; the accuracy benchmark peaked at
    1.94 GiB over 60). :meth:`Scribe.encode` calls this after each encoding:
    it stays near 0.5 GiB. Fixing the threshold instead (``mallopt``) also
    bounded the peak, but made each study 1.3-1.4x slower (every large
    tensor became fresh pages); ``benchmarks/inference.py`` measures both.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def load_cached(model_dir: Path | str | None = None) -> Scribe:
    """:meth:`Scribe.load` once per process and folder (the worker's model cache)."""
    key = (Path(model_dir) if model_dir is not None else DEFAULT_MODEL_DIR).resolve()
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = Scribe.load(key)
        return _CACHE[key]
