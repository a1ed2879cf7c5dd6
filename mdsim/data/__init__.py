from .format import SplitData, load_split, save_split, split_dir, load_metadata, save_metadata  # noqa: F401
