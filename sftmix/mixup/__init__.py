"""Steps 2-3: Mixup on balanced confident x unconfident pairs, as a regulariser of NTP."""
