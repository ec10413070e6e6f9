"""The group page, ``output_dir/group/regions.html``: each region's values across the series, outliers flagged."""
import html

import numpy as np

from ..files import write_text_atomically
from .figures import plt

PLOTS = (('chi_mean', 'mean chi (ppm)', 'regions_chi'), ('r2star_mean', 'mean R2* (1/s)', 'regions_r2star'))
STYLE = ('body { font-family: Helvetica, Arial, sans-serif; margin: 1em 2em 3em 2em; color: #222; max-width: 1400px; }'
         ' h1 { border-bottom: 2px solid #0b5394; } table { border-collapse: collapse; font-size: 0.9em; }'
         ' th, td { text-align: left; padding: 2px 1em 2px 0; } th { color: #555; font-weight: normal; }'
         ' img { max-width: 100%; }')


def region_plot(rows, key, label, path):
    """One panel per region: each series' value, outliers (``chi_mean_outlier``) in red and named."""
    regions = list(dict.fromkeys(row['region'] for row in rows))
    columns = min(6, len(regions))
    lines = int(np.ceil(len(regions) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(2.3 * columns, 2.1 * lines), squeeze=False, dpi=100)
    for axis in axes.ravel()[len(regions):]:
        axis.set_axis_off()
    for axis, region in zip(axes.ravel(), regions):
        members = [row for row in rows if row['region'] == region and np.isfinite(row[key])]
        values = np.array([row[key] for row in members])
        outliers = np.array([row['chi_mean_outlier'] for row in members], dtype=bool)
        spread = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
        axis.scatter(spread[~outliers], values[~outliers], s=14, color='#0b5394')
        axis.scatter(spread[outliers], values[outliers], s=18, color='#c00000')
        for x, value, row in zip(spread[outliers], values[outliers], np.array(members, dtype=object)[outliers]):
            axis.annotate(row['series'], (x, value), fontsize=6, color='#c00000', xytext=(4, 0),
                          textcoords='offset points')
        if len(values):
            axis.axhline(np.median(values), color='#888', linewidth=0.8)
        axis.set_title(region, fontsize=8)
        axis.set_xticks([])
        axis.set_xlim(-0.5, 0.5)
        axis.tick_params(labelsize=7)
        axis.set_ylabel(label, fontsize=7)
    figure.tight_layout()
    figure.savefig(path, facecolor='white')
    plt.close(figure)


def write_group_report(rows, folder, template):
    """Write ``regions.html`` and its figures (``figures/``) into ``folder``."""
    figures = folder / 'figures'
    figures.mkdir(parents=True, exist_ok=True)
    for key, label, name in PLOTS:
        region_plot(rows, key, label, figures / f'{name}.png')
    series = sorted({row['series'] for row in rows})
    outliers = [row for row in rows if row['chi_mean_outlier']]
    outlier_rows = ''.join(f'<tr><td>{html.escape(row["series"])}</td><td>{html.escape(row["region"])}</td>'
                           f'<td>{row["chi_mean"]:.4f}</td></tr>' for row in outliers)
    outlier_html = (f'<table><tr><th>series</th><th>region</th><th>mean chi (ppm)</th></tr>{outlier_rows}</table>'
                    if outliers else '<p>No outliers.</p>')
    page = f'''<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>qsmprep group: regions of {html.escape(template.atlas.name)}</title>
<style>{STYLE}</style></head>
<body>
<h1>qsmprep group level</h1>
<p>{len(series)} series of {len({row["participant_id"] for row in rows})} participants; regions of
<code>{html.escape(template.atlas.name)}</code> brought from <code>{html.escape(template.name)}</code> onto each
series by an affine registration of its first-echo magnitude, each voxel taking the label that covers most of it;
statistics over each region inside the local-field mask. The table: <code>desc-regions_stats.tsv</code> (columns
described in <code>desc-regions_stats.json</code>).</p>
<h1>Mean susceptibility per region</h1>
<p>One dot per series; the grey line is the median; red: further from it than the data dictionary's robust
z-score allows (from 5 series on).</p>
<img src="figures/regions_chi.png" alt="mean chi per region">
<h1>Mean R2* per region</h1>
<img src="figures/regions_r2star.png" alt="mean R2* per region">
<h1>Outliers</h1>
{outlier_html}
</body>
</html>
'''
    write_text_atomically(folder / 'regions.html', page)
