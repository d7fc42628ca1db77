"""Layer 4, ``pneumobatch train``: configuration, data and splits, augmentation, the loop, operating points and
applicability fitting. Imports the layers below it.
"""
