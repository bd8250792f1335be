"""SFTMixAxolotlTrainer: axolotl's AxolotlTrainer + sftmix.mixup.mixin.SFTMixMixin (returned by the axolotl plugin).

    from sftmix.integrations.axolotl_trainer import SFTMixAxolotlTrainer   # after axolotl registered the plugin

Imported only from SFTMixPlugin.get_trainer_cls: importing axolotl's trainer module builds its training-arguments
class, which has to include the plugin's MixupArguments mixin. axolotl builds the trainer with keyword arguments
(`args=`, `train_dataset=`), which SFTMixMixin's __init__ prepares the rows from.
"""

from __future__ import annotations

from axolotl.core.trainers.base import AxolotlTrainer

from sftmix.mixup.mixin import SFTMixMixin


class SFTMixAxolotlTrainer(SFTMixMixin, AxolotlTrainer):
    """AxolotlTrainer (its NTP loss, optimizers, callbacks, checkpointing) with the SFTMix balanced sampler,
    hidden-state capture, Mixup term, `ntp_loss`/`mixup_loss` logs and non-finite guard of sftmix.mixup.mixin."""
