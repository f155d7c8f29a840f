-- The publication walhook reads, created by hand (run as the tables' owner). A
-- publication walhook did not create is used as it is: list every table the
-- config names, or walhook stops with an error naming the missing table.
CREATE PUBLICATION walhook FOR TABLE public.customers;
-- Tables added to the config later:
-- ALTER PUBLICATION walhook ADD TABLE public.contracts;
