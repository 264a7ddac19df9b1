"""Data sets by spec string: ``fake``, ``elpv``, ``cifar10:PATH``, ``cifar100:PATH``, ``mnist:PATH``,
``fashion_mnist:PATH``, ``imagefolder:PATH`` (options as ``name:PATH,key=value``).

    from vitscope.data import create_loader, data_info
    loader = create_loader("cifar10:~/data/cifar", split="train", batch_size=128, augment=True)
    info = data_info("elpv:labels=levels")   # DataInfo(name, num_classes, in_chans, img_size, mean, std, ...)
"""
from vitscope.data.factory import DataInfo, create_dataset, create_loader, data_info, dataset_targets
from vitscope.data.specs import DataSpec, list_datasets, parse_spec
from vitscope.data.subsample import steps_constant_epochs, subsample_per_class

__all__ = [
    "DataInfo", "DataSpec", "create_dataset", "create_loader", "data_info", "dataset_targets", "list_datasets",
    "parse_spec", "steps_constant_epochs", "subsample_per_class",
]
