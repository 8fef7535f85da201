"""ptychostream.ioc: the edge IOC and its clients.

``server`` (EdgeIOC, ``ptychostream-ioc``), ``pvtable`` (the PV table as p4p SharedPVs),
``ca_mirror`` (Channel Access mirror, caproto), ``model_store`` (last good models on disk),
``client`` (deploy_model, put_positions, reset_stitch, get_stitched), ``sim_detector``
(FramePublisher, SimDetector, ``ptychostream-sim-detector``), ``screens/ptychostream.bob``.
"""
