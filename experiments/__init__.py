"""Study scripts that run many configs and summarise them (python -m experiments.ablate is
`jtl ablate`); jtl never imports them."""
