"""Download the StABlE paper's data sets (MD17 aspirin, MD22 Ac-Ala3-NHMe, water) or make
offline GFN2-xTB reference data, and write the train/val/test split layout.

    python download_stable_paper_data.py                      # md17 + md22 + water, random splits
    python download_stable_paper_data.py --dataset md17 --molecule aspirin --both
    python download_stable_paper_data.py --dataset xtb --molecule ethanol --frames 200
    python download_stable_paper_data.py --dataset xtb --molecule aspirin --raw data/raw/xtb_aspirin_500K.npz

See docs/data.md.
"""
import sys

from mdsim.data.download import main

if __name__ == "__main__":
    sys.exit(main())
