-- stage: curation
-- Rows of train_set that share (experiment, round, prompt_id, sample_idx).
with final as (
    select 'train_set' as tbl, experiment, round, prompt_id, sample_idx, count(*) as copies
    from train_set
    where experiment = $experiment and round = $round
    group by all
    having count(*) > 1
)

select * from final
