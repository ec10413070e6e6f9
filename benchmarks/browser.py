"""Open an HTML page in headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by
Selenium) as a user's browser would: what loaded, what the console said, and a screenshot."""
import base64
import shutil
from pathlib import Path

CHROMIUM = ('chromium', 'chromium-browser', 'google-chrome')
WINDOW_WIDTH = 1400


def chromium_paths():
    """(browser, driver) executables, or None when either is missing."""
    browser = next((shutil.which(name) for name in CHROMIUM if shutil.which(name)), None)
    driver = shutil.which('chromedriver')
    return (browser, driver) if browser and driver else None


def open_page(html_path, screenshot=None):
    """Load ``html_path`` from disk; returns its title, each image's (loaded, width, height, src) and
    the console's messages. With ``screenshot``, also writes a PNG of the whole page there."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver_path = chromium_paths()
    options = webdriver.ChromeOptions()
    # No sandbox: containers and CI run as root, where Chromium's sandbox cannot start.
    for argument in ('--headless=new', '--no-sandbox', '--disable-gpu', '--disable-dev-shm-usage',
                     f'--window-size={WINDOW_WIDTH},1000'):
        options.add_argument(argument)
    options.binary_location = browser
    options.set_capability('goog:loggingPrefs', {'browser': 'ALL'})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(Path(html_path).resolve().as_uri())
        images = driver.execute_script(
            'return Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.src]);')
        page = {'title': driver.title, 'images': images, 'console': driver.get_log('browser')}
        if screenshot is not None:
            height = driver.execute_script('return document.documentElement.scrollHeight;')
            driver.set_window_size(WINDOW_WIDTH, height)
            capture = driver.execute_cdp_cmd('Page.captureScreenshot', {'format': 'png', 'captureBeyondViewport': True})
            Path(screenshot).write_bytes(base64.b64decode(capture['data']))
        return page
    finally:
        driver.quit()
