"""SFTMix inside other training tools: `sftmix.integrations.axolotl` (an axolotl plugin). See docs/integrations.md."""
