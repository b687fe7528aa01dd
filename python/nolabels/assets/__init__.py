"""Package data: ``imagenet_classes.txt`` (the 1,000 ImageNet-1k class names, for the
surrogate encoder) and ``cifar10_demo.tar.gz`` (1,000 CIFAR-10 test JPEGs for
``nolabels demo``)."""
