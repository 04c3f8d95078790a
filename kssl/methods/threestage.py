"""Three-stage self-training (Ke et al., "Three-stage self-training framework for
semi-supervised semantic segmentation"): staged pseudo-masks and a multi-task network.

Each stage trains a freshly initialised network; only pseudo-masks pass between stages
(`kssl.training` runs the stages and writes the masks, `kssl.data.pseudo_masks` stores them):

- stage 1: supervised training on the labelled images; its network then labels every
  training image (the first pseudo-masks; with `reliable_share`, ST++'s selection, only
  the most stable unlabelled images keep theirs);
- stage 2: a mean teacher plus an auxiliary branch with its own half-width copy of the last
  backbone block and its own head, which learns the stored pseudo-masks; the teacher's main
  branch then writes the second pseudo-masks;
- stage 3: as stage 2 with an auxiliary branch that is only a second head on the shared
  backbone, learning the second pseudo-masks; the final model.

A stage 2/3 step (paper Eq. 4-5, the released code's details): a labelled sub-batch and a
sub-batch drawn from all training images. The teacher labels both on the weak view; the
student sees the labelled images as they are and the others strongly augmented (A:
RandAugment + Cutout). Teacher labels and stored pseudo-masks of the augmented images are
moved by A's geometric part (B) through coordinate maps.
  L = w_seg CE(student(x_l), y_l)
    + w_con CE(student([x_l; A(x_u)]), [argmax T(x_l); B(argmax T(x_u))])
    (with `distribution_alignment`, argmax of T's probabilities aligned to the labelled
    class prior, a control that neither the paper nor the released code has)
    + w_pl  CE(aux([x_l; A(x_u)]), [PL(x_l); B(PL(x_u))])
Where the paper and the released code differ, the code is the default and the paper's
choice an option (each noted at its argument).
"""

from __future__ import annotations

import random
from typing import Optional, Sequence

import tensorflow as tf

from kssl import losses
from kssl.augment import randaugment, seeds
from kssl.constants import PSEUDO_MASK_KEY as PSEUDO_MASK
from kssl.methods import ema
from kssl.methods import pseudo_label_controls as controls
from kssl.methods.base import SegmentationMethod, unpack_batch
from kssl.models import branches
from kssl import optimizers

_STRONG_STREAM = 1  # random stream of the strong augmentation (see seeds.step_seed)
BRANCH_OF_STAGE = {2: "last_block", 3: "head"}


class ThreeStage(SegmentationMethod):
    """One stage of three-stage self-training (`stage` = 1, 2 or 3).

    `bin/train` with `train.method = @ThreeStage` runs the three stages in turn (each in its
    own gin scope, `stage_1/...`, so stage 1 can have its own steps and batch size).

    Args:
      segmenter: the main network (freshly initialised from the pretrained weights).
      num_classes: number of classes.
      stage: 1 (supervised), 2 or 3 (mean teacher + auxiliary branch on pseudo-masks).
      seg_weight, con_weight, pl_weight: weights of L_seg, L_con, L_pl. Defaults 1, 0.25,
        0.25: the released VOC setting (212 labels), i.e. the paper's lambda1 = lambda2 =
        1/4; the released Cityscapes setting is 0.5, 0.25, 0.25.
      strong_augment: True (`RandAugmentCutout()`: RandAugment as the released code, 3 ops,
        p 0.5, levels 1-9, plus 3 Cutout squares of 32 px), False (no strong view), or a
        callable `(images, seed) -> (images, coords)` (see `kssl.augment.randaugment`).
      ema_boundaries, ema_decays: the teacher's decay by step, piecewise constant. Default:
        the released code's schedule by 1000-step epoch (0.99 to step 20k, then 0.995,
        0.9975 from 40k, 0.999 from 50k); the paper states no schedule.
      branch_width: channel fraction of the stage-2 branch's copy of the last block (0.5).
      placeholder_class: give the auxiliary head num_classes + 1 outputs, as the released
        code (the extra class is never a target); False gives num_classes, as the paper.
      pseudo_masks_from: which network writes the next stage's pseudo-masks in stage 2:
        "teacher" (main branch; the released code) or "student" (the paper's f_theta).
        Stage 1 has only the student.
      inference: the network evaluated and exported in stages 2-3: "teacher" (the released
        code) or "student".
      pseudo_mask_threshold: a control against confirmation bias: the stored
        pseudo-masks keep a pixel's class only where the writing network's softmax
        confidence reaches this, and the ignore label elsewhere (None: every pixel, as
        the paper and the released code).
      reliable_share: ST++'s reliable-image selection (Yang et al., CVPR 2022), off by
        default (None: every image's pseudo-mask is kept, as the paper and the released
        code). With a share s, stage 1 records its network's argmax on the unlabelled
        images at `reliable_checkpoints` - 1 evenly spaced steps, scores each image by the
        mean over those of the mean IoU with its final argmax, and stores all-ignore
        pseudo-masks for all but the s most stable images (labelled images keep theirs):
        stage 2's pseudo-mask loss learns from the reliable images only, and stage 2's
        teacher then labels every image for stage 3 (ST++'s relabelling with the improved
        model). Combines with `pseudo_mask_threshold`, which filters the kept masks.
      reliable_checkpoints: K, the checkpoints ST++ compares, the final one included (3,
        as ST++'s released code).
      distribution_alignment: a control against confirmation bias in stages 2-3, off by
        default (the paper and the released code take the teacher's plain argmax): the
        teacher's consistency targets, on both sub-batches, are the argmax of its
        probabilities multiplied by the labelled class prior over a running average of
        its class distribution on the second sub-batch, renormalised (ReMixMatch; DARS
        for segmentation; needs `class_prior`, which the driver passes). Each stage
        starts the running average at the prior. The stored pseudo-masks are not aligned.
      control_decay: decay of that running class distribution per step (0.99).
      backbone_lr_multiplier: learning-rate factor of the backbone blocks shared with the
        pretrained network (0.1, the released code); new layers (heads, the branch) train
        at the full rate. Use 1.0 for a backbone trained from scratch.
      seed: seeds the strong augmentation (stateless per step and global example index);
        default: drawn from Python's `random` (seeded by `train.seed`).
    """

    stages = 3
    tracked_losses = ("loss", "segmentation_loss", "consistency_loss", "pseudo_mask_loss")

    def __init__(self, segmenter, num_classes, stage: int = 1, seg_weight: float = 1.0,
                 con_weight: float = 0.25, pl_weight: float = 0.25, strong_augment=True,
                 ema_boundaries: Sequence[int] = (20000, 40000, 50000),
                 ema_decays: Sequence[float] = (0.99, 0.995, 0.9975, 0.999),
                 branch_width: float = 0.5, placeholder_class: bool = True,
                 pseudo_masks_from: str = "teacher", inference: str = "teacher",
                 backbone_lr_multiplier: float = 0.1,
                 pseudo_mask_threshold: Optional[float] = None,
                 reliable_share: Optional[float] = None, reliable_checkpoints: int = 3,
                 distribution_alignment: bool = False, control_decay: float = 0.99,
                 seed: Optional[int] = None, **kwargs):
        if stage not in (1, 2, 3):
            raise ValueError(f"ThreeStage stage must be 1, 2 or 3, got {stage!r}")
        for name, value in [("pseudo_masks_from", pseudo_masks_from),
                            ("inference", inference)]:
            if value not in ("teacher", "student"):
                raise ValueError(f"ThreeStage {name} must be 'teacher' or 'student', "
                                 f"got {value!r}")
        super().__init__(segmenter, num_classes,
                         tracked_losses=("loss",) if stage == 1 else None, **kwargs)
        self.stage = stage
        self.seg_weight = seg_weight
        self.con_weight = con_weight
        self.pl_weight = pl_weight
        if strong_augment is True:
            strong_augment = randaugment.RandAugmentCutout()
        self.strong_augment = strong_augment or None
        self.pseudo_masks_from = pseudo_masks_from
        if pseudo_mask_threshold is not None and not 0.0 <= pseudo_mask_threshold <= 1.0:
            raise ValueError(f"ThreeStage pseudo_mask_threshold must be in [0, 1] or None, "
                             f"got {pseudo_mask_threshold!r}")
        self.pseudo_mask_threshold = pseudo_mask_threshold
        if reliable_share is not None and not 0.0 < reliable_share <= 1.0:
            raise ValueError(f"ThreeStage reliable_share must be in (0, 1] or None, "
                             f"got {reliable_share!r}")
        if isinstance(reliable_checkpoints, bool) or not isinstance(
                reliable_checkpoints, int) or reliable_checkpoints < 2:
            raise ValueError(f"ThreeStage reliable_checkpoints must be an integer >= 2 (the "
                             f"final checkpoint and an earlier one), got "
                             f"{reliable_checkpoints!r}")
        if not 0.0 <= control_decay < 1.0:  # checked before stage 1 trains, not in stage 2
            raise ValueError(f"ThreeStage control_decay must be in [0, 1), "
                             f"got {control_decay!r}")
        self.reliable_share = reliable_share
        self.reliable_checkpoints = reliable_checkpoints
        self.inference = inference
        self.backbone_lr_multiplier = backbone_lr_multiplier
        self.seed = random.randrange(2**31) if seed is None else int(seed)
        self.auxiliary = self.teacher = self.ema = self.alignment = None
        if stage > 1:
            self.auxiliary = branches.auxiliary_branch(
                segmenter, BRANCH_OF_STAGE[stage],
                num_classes + 1 if placeholder_class else num_classes,
                width=branch_width, name=f"auxiliary_stage{stage}")
            self.teacher = ema.clone_network(segmenter)
        self.build_networks()
        if stage > 1:
            self.ema = ema.EMATeacher(
                segmenter, self.teacher, include_statistics=True,
                schedule=lambda step: ema.stepwise_decay(step, ema_boundaries, ema_decays))
            # State in a Keras weight: saved with the checkpoints, identical on replicas.
            _, self.alignment = controls.control_layers(
                "ThreeStage", num_classes, self.class_prior, False, distribution_alignment,
                control_decay)

    @staticmethod
    def uses_unlabelled_in(stage: int) -> bool:
        """Whether a stage reads a second sub-batch (stage 1 trains on labelled images)."""
        return stage > 1

    # -- networks -------------------------------------------------------------------
    def networks(self) -> list:
        """The student, and in stages 2-3 its auxiliary branch and the teacher."""
        return [n for n in (self.segmenter, self.auxiliary, self.teacher) if n is not None]

    def backbone_variables(self) -> list:
        """The trainable variables of the student's backbone blocks (shared by the branch)."""
        return [v for layer in self.segmenter.block_layers for v in layer.trainable_variables]

    def optimized_variables(self) -> list:
        """The student's and the branch's own trainable variables (not the teacher's)."""
        variables, seen = [], set()
        for network in (self.segmenter, self.auxiliary):
            for v in network.trainable_variables if network is not None else ():
                if id(v) not in seen:
                    seen.add(id(v))
                    variables.append(v)
        return variables

    @property
    def inference_network(self):
        """Stage 1: the student; stages 2-3: the teacher (or the student, see `inference`)."""
        if self.stage > 1 and self.inference == "teacher":
            return self.teacher
        return self.segmenter

    @property
    def pseudo_mask_network(self):
        """The network whose argmax becomes the next stage's pseudo-masks."""
        if self.stage > 1 and self.pseudo_masks_from == "teacher":
            return self.teacher
        return self.segmenter

    def pseudo_label_targets(self, images, labelled_images=None) -> dict:
        """Stages 2-3: the teacher's consistency targets (argmax on the weak view, aligned
        with the stored running distribution under `distribution_alignment`, every pixel
        admitted). The stored pseudo-masks are scored when they are written (the run's
        `pseudo_masks` report). Stage 1 trains on labels alone: {}."""
        if self.stage == 1:
            return {}
        # The stored running distribution, nothing updated: the monitor's view.
        labels = self.consistency_labels(self.teacher(images, training=False), update=False)
        return {"teacher": (labels, None)}

    def consistency_labels(self, teacher_logits, num_labelled=0, update=True):
        """The teacher's hard labels for the consistency term: the argmax of its logits,
        or under `distribution_alignment` of its probabilities aligned by the running
        class distribution (first folding in the second sub-batch, from `num_labelled`,
        when `update`)."""
        if self.alignment is None:
            return tf.argmax(teacher_logits, axis=-1, output_type=tf.int32)
        probs = tf.nn.softmax(tf.cast(teacher_logits, tf.float32))
        running = self.alignment.updated(probs[num_labelled:]) if update else None
        return tf.argmax(self.alignment.rescale(probs, running), axis=-1,
                         output_type=tf.int32)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        optimizers.set_learning_rate_multiplier(self.optimizer, self.backbone_variables(),
                                                self.backbone_lr_multiplier)

    def student_outputs(self, images, training=None):
        """(main logits, auxiliary logits) of the student, the shared trunk run once."""
        shared = self.auxiliary.shared_blocks
        size = tf.shape(images)[1:3]
        trunk = self.segmenter.features(images, training=training, upto=shared)
        main = self.segmenter.logits_from_features(
            self.segmenter.extend_features(trunk, shared, training=training), size, training)
        aux = self.auxiliary.logits_from_features(
            self.auxiliary.extend_features(trunk, shared, training=training), size, training)
        return main, aux

    # -- steps ----------------------------------------------------------------------
    def train_step(self, data):
        if self.stage == 1:
            return self.supervised_step(data)
        labelled, unlabelled = unpack_batch(data)
        if unlabelled is None or PSEUDO_MASK not in labelled or PSEUDO_MASK not in unlabelled:
            raise ValueError("ThreeStage stages 2-3 need (labelled, unlabelled) elements "
                             f"that carry stored pseudo-masks under {PSEUDO_MASK!r}")
        # The 0-based index of this step, read before the optimizer increments it.
        step = tf.identity(self.optimizer.iterations)
        images_l, masks_l = labelled["image"], labelled["mask"]
        images_u = unlabelled["image"]
        num_l = tf.shape(images_l)[0]

        # 1. The teacher labels both sub-batches on their weak views (hard argmax).
        teacher_logits = self.teacher(tf.concat([images_l, images_u], 0), training=False)
        teacher_labels = tf.stop_gradient(self.consistency_labels(teacher_logits, num_l))
        # 2. Strong view A of the second sub-batch only; its geometric part B moves the
        #    teacher labels and the stored pseudo-masks with the pixels.
        pseudo_l, pseudo_u = labelled[PSEUDO_MASK], unlabelled[PSEUDO_MASK]
        teacher_u = teacher_labels[num_l:]
        if self.strong_augment is not None:
            images_u, coords = self.strong_augment(
                images_u, seeds.step_seed(self.seed, step, _STRONG_STREAM))
            teacher_u = randaugment.warp_labels(teacher_u, coords, self.ignore_label)
            pseudo_u = randaugment.warp_labels(pseudo_u, coords, self.ignore_label)
        consistency_targets = tf.concat([teacher_labels[:num_l], teacher_u], 0)
        pseudo_targets = tf.concat([pseudo_l, pseudo_u], 0)

        # 3. Eq. 4-5 on the student's main and auxiliary outputs for [x_l; A(x_u)].
        with tf.GradientTape() as tape:
            main, aux = self.student_outputs(tf.concat([images_l, images_u], 0),
                                             training=True)
            seg_loss = self.supervised_loss(main[:num_l], masks_l)
            con_loss = losses.masked_cross_entropy(main, consistency_targets,
                                                   self.ignore_label)
            pl_loss = losses.masked_cross_entropy(aux, pseudo_targets, self.ignore_label)
            loss = (self.seg_weight * seg_loss + self.con_weight * con_loss
                    + self.pl_weight * pl_loss)
        self.apply_gradients(tape, loss, self.optimized_variables())
        # 4. The teacher follows the student after the optimizer step.
        self.ema.update(step)
        return self.report(loss=loss, segmentation_loss=seg_loss,
                           consistency_loss=con_loss, pseudo_mask_loss=pl_loss)
