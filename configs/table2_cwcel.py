"""CW-CEL, Table 2: the same experiment as Table 1's CW-CEL row.

    cxr-jax train --config configs/table2_cwcel.py --workdir W \
        --config.data_dir=DATA --config.init_weights=imagenet.npz

Loss `cw_cel`, no auxiliary task, 9,000 steps, with transfer. The paper
reports a mean AUC of 0.8075 over the 14 diseases in both tables.
"""

from configs.table1_cwcel import get_config  # noqa: F401  (one experiment)
