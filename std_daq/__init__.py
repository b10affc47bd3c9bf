"""std_daq: the operator's command line (`std-daq`)."""
